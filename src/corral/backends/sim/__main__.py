"""The simulator's command line: `python -m corral.backends.sim --port 8001 --model demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from corral.backends.sim.config import SimConfig
from corral.backends.sim.server import run
from corral.errors import ConfigError


def parse_args(argv: list[str] | None = None) -> SimConfig:
    """Build a validated SimConfig from command-line arguments."""
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m corral.backends.sim",
        description="Deterministic OpenAI-compatible simulator backend.",
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--model", default=defaults.model, help="the model name served")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    parser.add_argument("--tpot", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="output tokens")
    parser.add_argument(
        "--load-time", type=float, default=0.0, help="seconds /health reports loading"
    )
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--unloaded", action="store_true", help="start with the model unloaded")
    parser.add_argument(
        "--slowdown",
        type=float,
        default=float(os.environ.get("CORRAL_SIM_SLOWDOWN", "1")),
        help="multiply every timing (ttft, tpot and the engine model's) "
        "(default: $CORRAL_SIM_SLOWDOWN or 1), e.g. one slow node",
    )
    parser.add_argument(
        "--fingerprint",
        default="",
        help="system_fingerprint of every answer and its x-sim-fingerprint header "
        "(default: fp_ and a digest of the other options)",
    )
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument(
        "--max-body",
        type=int,
        default=defaults.max_body,
        help="largest request body in bytes (uploads included); 413 past it",
    )
    parser.add_argument(
        "--stored-responses",
        type=int,
        default=defaults.stored_responses,
        help="responses kept for previous_response_id, GET and DELETE",
    )
    engine = parser.add_argument_group(
        "engine model",
        "slots, a FIFO queue, a block-hashed LRU prefix cache and load-dependent token times; "
        "on when --slots > 0 (ttft and tpot then add to its prefill and decode times)",
    )
    engine.add_argument("--slots", type=int, default=0, help="requests running at once")
    engine.add_argument(
        "--prefill-per-token",
        type=float,
        default=0.0,
        help="seconds per prompt token not in the prefix cache (4 bytes = 1 token)",
    )
    engine.add_argument(
        "--decode-base", type=float, default=0.0, help="seconds per output token ..."
    )
    engine.add_argument(
        "--decode-slope", type=float, default=0.0, help="... plus this per running request"
    )
    engine.add_argument(
        "--cache-blocks",
        type=int,
        default=defaults.cache_blocks,
        help="prefix-cache capacity in blocks (0: no cache)",
    )
    engine.add_argument(
        "--block-tokens", type=int, default=defaults.block_tokens, help="tokens per block"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    slow = args.slowdown
    config = SimConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        ttft=args.ttft * slow,
        tpot=args.tpot * slow,
        tokens=args.tokens,
        load_time=args.load_time,
        embedding_dim=args.embedding_dim,
        seed=args.seed,
        unloaded=args.unloaded,
        slots=args.slots,
        prefill_per_token=args.prefill_per_token * slow,
        decode_base=args.decode_base * slow,
        decode_slope=args.decode_slope * slow,
        cache_blocks=args.cache_blocks,
        block_tokens=args.block_tokens,
        max_model_len=args.max_model_len,
        max_body=args.max_body,
        stored_responses=args.stored_responses,
        fingerprint=args.fingerprint,
    )
    try:
        return config.validate()
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        run(config)
    except OSError as exc:  # typically the port is taken; one line for the supervisor's log
        sys.exit(f"sim: cannot listen on {config.host}:{config.port}: {exc}")


if __name__ == "__main__":
    main()
