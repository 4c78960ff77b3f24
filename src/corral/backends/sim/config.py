"""SimConfig: every knob of the simulator backend, built once from the CLI or a test."""

from __future__ import annotations

from dataclasses import dataclass

from corral.errors import ConfigError

MAX_BODY_BYTES = 16 * 1024 * 1024


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

    def validate(self) -> SimConfig:
        """Return self, or raise ConfigError naming the first invalid field."""
        if not self.model:
            raise ConfigError("must not be empty", field="model")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.port} is not a TCP port", field="port")
        for name in ("ttft", "tpot", "load_time"):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", field=name)
        if self.tokens < 0:
            raise ConfigError("must be >= 0", field="tokens")
        if self.embedding_dim < 1:
            raise ConfigError("must be >= 1", field="embedding_dim")
        if self.max_body < 1:
            raise ConfigError("must be >= 1", field="max_body")
        return self
