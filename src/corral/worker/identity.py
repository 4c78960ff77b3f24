"""The worker's identity on disk: node id and credential, kept so a restart is the same node."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    credential: str


def identity_path(data_dir: Path) -> Path:
    return data_dir / "node.json"


def load_identity(data_dir: Path) -> Identity | None:
    """The saved identity, or None when this data directory never joined a cluster."""
    path = identity_path(data_dir)
    try:
        data = json.loads(path.read_text())
        return Identity(node_id=str(data["node_id"]), credential=str(data["credential"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"{path}: unreadable node identity ({exc}); remove it to rejoin"
        ) from exc


def save_identity(data_dir: Path, identity: Identity) -> None:
    """Write the identity atomically, readable only by this user (it holds a secret)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = identity_path(data_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"node_id": identity.node_id, "credential": identity.credential}, f)
    os.replace(tmp, path)
