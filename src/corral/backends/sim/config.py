"""SimConfig: every knob of the simulator backend, built once from the CLI or a test."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import orjson

from corral.errors import ConfigError

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_FINGERPRINT = 200

# Fields that say where a replica listens, not how it answers: left out of the fingerprint.
_PLACEMENT = frozenset({"host", "port", "fingerprint"})


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Settings of one simulator process; immutable, validated by `validate()`."""

    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    ttft: float = 0.0  # seconds before the first token
    tpot: float = 0.0  # seconds between two tokens
    tokens: int = 16  # output tokens when the request does not cap them lower
    load_time: float = 0.0  # seconds during which /health says "loading"
    embedding_dim: int = 384
    seed: int = 0  # mixed into every generation, so two servers can disagree on purpose
    unloaded: bool = False  # start with the model switched off (admin switch)
    max_body: int = MAX_BODY_BYTES  # larger request bodies get 413
    # The engine model (off while slots == 0): see scheduler.py.
    slots: int = 0  # requests running at once; more wait in a FIFO queue
    prefill_per_token: float = 0.0  # seconds per prompt token not in the prefix cache
    decode_base: float = 0.0  # seconds per output token with one request running ...
    decode_slope: float = 0.0  # ... plus this much per request running
    cache_blocks: int = 4096  # prefix-cache capacity in blocks
    block_tokens: int = 16  # tokens per cache block (4 bytes of prompt = 1 token)
    max_model_len: int = 32768  # what /tokenize reports
    stored_responses: int = 1024  # /v1/responses kept for previous_response_id and GET
    fingerprint: str = ""  # system_fingerprint and x-sim-fingerprint; "" derives one

    @property
    def engine_model(self) -> bool:
        """Whether requests go through the engine model (slots, queue, prefix cache)."""
        return self.slots > 0

    @property
    def system_fingerprint(self) -> str:
        """`fingerprint`, or `fp_` and a digest of every option that shapes the answers."""
        if self.fingerprint:
            return self.fingerprint
        options = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _PLACEMENT
        }
        digest = hashlib.sha256(orjson.dumps(options, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return "fp_" + digest[:12]

    def validate(self) -> SimConfig:
        """Return self, or raise ConfigError naming the first invalid field."""
        if not self.model:
            raise ConfigError("must not be empty", field="model")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.port} is not a TCP port", field="port")
        for name in (
            "ttft",
            "tpot",
            "load_time",
            "prefill_per_token",
            "decode_base",
            "decode_slope",
        ):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", field=name)
        for name in ("tokens", "slots", "cache_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", field=name)
        for name in ("embedding_dim", "max_body", "block_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", field=name)
        if self.stored_responses < 0:
            raise ConfigError("must be >= 0", field="stored_responses")
        fp = self.fingerprint
        if len(fp) > MAX_FINGERPRINT or not all(" " <= c <= "~" for c in fp):
            raise ConfigError(
                f"must be printable ASCII of at most {MAX_FINGERPRINT} characters",
                field="fingerprint",
            )
        return self
