"""The admin key file a frontend keeps in its data dir (mode 600; its path is shown, never it)."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from corral.config import ADMIN_KEY_FILE, default_data_dir

log = logging.getLogger(__name__)


def default_admin_key() -> str | None:
    """The admin key corral serve / corral up keep in the data dir ($CORRAL_DATA_DIR or the
    per-user one), when it is readable: what the CLI sends by default."""
    base = os.environ.get("CORRAL_DATA_DIR")
    path = (Path(base) if base else default_data_dir()) / ADMIN_KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def read_or_create_admin_key(path: Path) -> str:
    """The admin key a frontend keeps in its data dir: created once (mode 600, its path is
    logged, the key never), read after."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-corral-admin-" + secrets.token_urlsafe(32)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.link(temporary, path)  # whole or not at all, and never over another's key
    except FileExistsError:  # another frontend process made it first
        return path.read_text().strip()
    finally:
        temporary.unlink(missing_ok=True)
    log.warning("created an admin key in %s (mode 600; the CLI reads it from there)", path)
    return key
