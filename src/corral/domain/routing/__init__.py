"""The routing pipeline: static filters -> not-full filter -> weighted scorers -> pick.

Pure functions of a snapshot (`Candidates`) plus request features (prefix block hashes from
`domain.prefix`, a session key) and load (in-flight counts, learned speed). Modules:
`candidates` (static filters, cached by the caller), `scorers` (`RoutingWeights` and the four
scorers), `speed` (`SpeedTracker`), `session` (`SessionTable`), `route` (the decision and its
per-request call contract).
"""

from corral.domain.routing.candidates import Candidates, supports
from corral.domain.routing.route import route
from corral.domain.routing.scorers import DEFAULT_WEIGHTS, RoutingWeights
from corral.domain.routing.session import SessionTable, session_key
from corral.domain.routing.speed import SpeedTracker

__all__ = [
    "DEFAULT_WEIGHTS",
    "Candidates",
    "RoutingWeights",
    "SessionTable",
    "SpeedTracker",
    "route",
    "session_key",
    "supports",
]
