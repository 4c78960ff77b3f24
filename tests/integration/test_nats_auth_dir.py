"""The NATS auth key directory on a real filesystem: modes, reloading, broken contents."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from corral.bus.natsauth import NatsAuthDir, NatsAuthKeys, auth_config
from corral.bus.natsjwt import NatsAuthError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_created_private_and_reloaded(tmp_path: Path) -> None:
    auth = NatsAuthDir(tmp_path / "nats-auth")
    assert not auth.exists()
    keys = auth.load_or_create()
    assert mode(auth.path) == 0o700
    for name in NatsAuthDir.FILES.values():
        assert mode(auth.path / name) == 0o600
    assert (auth.path / "frontend.nk").read_text().strip() == keys.frontend.seed
    assert auth.load_or_create() == keys == NatsAuthDir(auth.path).load()
    conf = auth.write_server_config(auth_config(keys))
    assert mode(conf) == 0o600 and conf.read_text() == auth_config(keys)
    assert not [p for p in auth.path.iterdir() if p.name.endswith(".tmp")]


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    auth = NatsAuthDir(tmp_path)
    auth.load_or_create()
    (tmp_path / "issuer.nk").unlink()
    with pytest.raises(NatsAuthError, match=r"issuer\.nk"):
        auth.load_or_create()


def test_a_malformed_key_file_is_named(tmp_path: Path) -> None:
    auth = NatsAuthDir(tmp_path)
    auth.load_or_create()
    (tmp_path / "system.nk").write_text("garbage\n")
    with pytest.raises(NatsAuthError, match=r"system\.nk: not an nkey seed"):
        auth.load()


def test_keys_in_the_wrong_files_are_refused(tmp_path: Path) -> None:
    auth = NatsAuthDir(tmp_path)
    keys = auth.load_or_create()
    (tmp_path / "issuer.nk").write_text(keys.frontend.seed)
    with pytest.raises(NatsAuthError, match="issuer nkey has the wrong role"):
        auth.load()


def test_readable_keys_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = NatsAuthDir(tmp_path)
    auth.load_or_create()
    (tmp_path / "frontend.nk").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="corral.bus.natsauth"):
        keys = auth.load()
    assert isinstance(keys, NatsAuthKeys)
    assert any("frontend.nk is readable by others" in r.getMessage() for r in caplog.records)
