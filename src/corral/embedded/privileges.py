"""Privileges of embedded server children: the unprivileged user a server runs as under root,
and the permissions that user needs on the data directory and the bundled binaries.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.errors import EmbeddedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user a server child runs as."""

    name: str
    uid: int
    gid: int


def system_user(name: str) -> RunAs:
    """Look up the system user `name`, creating it (no home, no shell) when missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        argv = [useradd, "--system", "--user-group", "--no-create-home"]
        argv += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except OSError as exc:
            raise EmbeddedError(f"cannot create system user {name!r}: {exc}") from exc
        if done.returncode not in (0, 9):  # 9: created concurrently by someone else
            raise EmbeddedError(
                f"cannot create system user {name!r} for PostgreSQL: {done.stderr.strip()}"
            ) from None
        logger.info("created system user %s to run PostgreSQL", name)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise EmbeddedError(f"system user {name!r} is missing after useradd") from None
    return RunAs(name, pw.pw_uid, pw.pw_gid)


def user_exists(name: str) -> bool:
    """Whether the system user `name` exists."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def data_owner(path: Path) -> RunAs | None:
    """The unprivileged user who owns `path` or, when root does (root creates what is missing
    of a data directory), its nearest ancestor that such a user owns; None when root owns
    them all."""
    for p in (path, *path.parents):
        if not p.exists():
            continue
        st = p.stat()
        if st.st_uid == 0:
            continue
        try:
            pw = pwd.getpwuid(st.st_uid)
        except KeyError:
            return RunAs(str(st.st_uid), st.st_uid, st.st_gid)
        return RunAs(pw.pw_name, st.st_uid, pw.pw_gid)
    return None


def _grant(path: Path, st: os.stat_result, user: RunAs, bits: int, *, fix: bool = True) -> None:
    """Give `user` the permission `bits` (a combination of S_IROTH/S_IXOTH) on `path`; with
    `fix` False, raise EmbeddedError instead of changing anything."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == user.uid:
        have = (mode & stat.S_IRWXU) >> 6
    elif st.st_gid == user.gid:
        have = (mode & stat.S_IRWXG) >> 3
    else:
        have = mode & stat.S_IRWXO
    if have & bits == bits:
        return
    what = ("r" if bits & stat.S_IROTH else "") + ("x" if bits & stat.S_IXOTH else "")
    if not fix:
        raise EmbeddedError(
            f"user {user.name} (who runs PostgreSQL) cannot reach {path}: it needs o+{what} "
            f"there (chmod o+{what} {path}), or run without --no-create-user"
        )
    logger.warning("chmod o+%s %s, so that user %s can reach it", what, path, user.name)
    os.chmod(path, mode | bits)


def ensure_traversable(path: Path, user: RunAs, *, fix: bool = True) -> None:
    """Make `path` and each of its ancestors traversable by `user` (or check, without `fix`)."""
    for p in (path, *path.parents):
        _grant(p, p.stat(), user, stat.S_IXOTH, fix=fix)


def ensure_readable_tree(root: Path, user: RunAs, *, fix: bool = True) -> None:
    """Make every directory under `root` listable and every file readable by `user` (or check,
    without `fix`)."""
    ensure_traversable(root, user, fix=fix)
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        _grant(d, d.stat(), user, stat.S_IROTH | stat.S_IXOTH, fix=fix)
        for name in filenames:
            f = d / name
            st = f.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            bits = stat.S_IROTH | (stat.S_IXOTH if st.st_mode & stat.S_IXUSR else 0)
            _grant(f, st, user, bits, fix=fix)
