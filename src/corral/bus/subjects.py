"""NATS subject names, all below one configurable prefix (default "corral")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds every subject Corral uses; `prefix` lets several clusters share one NATS."""

    prefix: str = "corral"

    # --- per node, request/reply -------------------------------------------------------
    def replica_start(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.replica.start"

    def replica_stop(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.replica.stop"

    def replicas_list(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.replicas.list"

    def backend_install(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.backend.install"

    def backend_upgrade(self, node_id: str) -> str:
        return f"{self.prefix}.node.{node_id}.backend.upgrade"

    # --- broadcast ------------------------------------------------------------------------
    @property
    def replica_events(self) -> str:
        return f"{self.prefix}.events.replica"

    @property
    def node_events(self) -> str:
        return f"{self.prefix}.events.node"

    @property
    def model_events(self) -> str:
        return f"{self.prefix}.events.model"

    def load_events(self, model: str) -> str:
        return f"{self.prefix}.events.load.{_token(model)}"

    @property
    def all_load_events(self) -> str:
        return f"{self.prefix}.events.load.>"

    @property
    def install_events(self) -> str:
        return f"{self.prefix}.events.install"

    @property
    def load_reports(self) -> str:
        return f"{self.prefix}.frontend.load"


def _token(name: str) -> str:
    """Make a model name safe as one subject token (no dots, spaces or wildcards)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"
