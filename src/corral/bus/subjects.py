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

    def node_all(self, node_id: str) -> str:
        """Every subject addressed to one node (what its worker may subscribe to)."""
        return f"{self.prefix}.node.{node_id}.>"

    # --- per node, progress a worker publishes (its id in the subject binds it to it) -------
    def node_progress(self, node_id: str) -> str:
        """Every progress subject of one node (what its worker may publish)."""
        return f"{self.prefix}.progress.{node_id}.>"

    def install_progress(self, node_id: str) -> str:
        return f"{self.prefix}.progress.{node_id}.install"

    def load_progress(self, node_id: str, model: str) -> str:
        return f"{self.prefix}.progress.{node_id}.load.{_token(model)}"

    @property
    def all_install_progress(self) -> str:
        return f"{self.prefix}.progress.*.install"

    @property
    def all_load_progress(self) -> str:
        return f"{self.prefix}.progress.*.load.>"

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
    def load_reports(self) -> str:
        return f"{self.prefix}.frontend.load"

    @property
    def key_events(self) -> str:
        """Broadcast: a frontend stored or deleted an API key (a hint: read them again)."""
        return f"{self.prefix}.frontend.keys"

    @property
    def prefix_index(self) -> str:
        """Broadcast among frontends: prompt-prefix hashes they routed, per replica (routing's
        shared `PrefixIndex`; workers may not publish it)."""
        return f"{self.prefix}.frontend.prefixes"

    @property
    def response_homes(self) -> str:
        """Broadcast: a frontend relayed a new stored response (its id and replica)."""
        return f"{self.prefix}.frontend.responses"

    @property
    def response_lookup(self) -> str:
        """Request/reply among frontends: where does this response live (only a frontend
        that knows answers)."""
        return f"{self.prefix}.frontend.responses.lookup"


def _token(name: str) -> str:
    """Make a model name safe as one subject token (no dots, spaces or wildcards)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"
