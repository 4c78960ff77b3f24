"""The data dir's admin key: made once with mode 600, read back after, never two keys."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from corral.keyfile import read_or_create_admin_key


def test_made_once_with_mode_600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "new" / "admin.key"
    key = read_or_create_admin_key(path)
    assert key.startswith("sk-corral-admin-") and len(key) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_admin_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["admin.key"]  # no temporary left


def test_racing_processes_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: read_or_create_admin_key(path), range(16)))
    assert keys == {path.read_text().strip()}
