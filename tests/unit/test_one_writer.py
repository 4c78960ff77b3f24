"""The single-writer rule, checked on the source: only the actuator's modules write cluster state.

Cluster state is the `nodes`, `models` and `replicas` table families (with load information
and install states). Any other frontend module may read them; a write there is a bug.
"""

from __future__ import annotations

import ast
from pathlib import Path

import corral.frontend

FRONTEND = Path(corral.frontend.__file__).parent
WRITERS = {"actuator.py", "replica_writes.py", "node_writes.py", "announce.py"}
#: Store methods that change a row of cluster state, per store of the registry.
WRITES = {
    "nodes": {"upsert", "heartbeat", "set_status", "set_labels", "delete"},
    "models": {"upsert", "set_scheduling", "delete", "delete_from_sources"},
    "replicas": {
        "add",
        "update",
        "remove",
        "remove_on_node",
        "touch",
        "record_load_info",
        "record_load_failure",
    },
    "installs": {"report"},
}


def writes_in(path: Path) -> list[str]:
    """`store.method` of every call `<anything>.registry.<store>.<write method>(...)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        store = node.func.value
        if not isinstance(store, ast.Attribute) or not isinstance(store.value, ast.Attribute):
            continue
        if store.value.attr == "registry" and node.func.attr in WRITES.get(store.attr, ()):
            found.append(f"{store.attr}.{node.func.attr}")
    return found


def test_only_the_actuator_writes_cluster_state() -> None:
    offenders = {
        path.name: writes_in(path)
        for path in sorted(FRONTEND.glob("*.py"))
        if path.name not in WRITERS and writes_in(path)
    }
    assert offenders == {}


def test_the_check_sees_the_actuators_own_writes() -> None:
    found = set(writes_in(FRONTEND / "replica_writes.py"))
    assert {"replicas.add", "replicas.update", "replicas.remove"} <= found
