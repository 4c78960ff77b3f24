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
        help="multiply ttft and tpot (default: $CORRAL_SIM_SLOWDOWN or 1), e.g. one slow node",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    config = SimConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        ttft=args.ttft * args.slowdown,
        tpot=args.tpot * args.slowdown,
        tokens=args.tokens,
        load_time=args.load_time,
        embedding_dim=args.embedding_dim,
        seed=args.seed,
        unloaded=args.unloaded,
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
