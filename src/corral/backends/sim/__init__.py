"""The simulator backend: a fast deterministic OpenAI-compatible server for tests and benches."""

from corral.backends.sim.config import SimConfig
from corral.backends.sim.engine import SimEngine
from corral.backends.sim.server import SimServer, run

__all__ = ["SimConfig", "SimEngine", "SimServer", "run"]
