"""`Spool`: an upload kept in memory up to its threshold, in a temporary file beyond it, read
back whole as often as a retry needs, and gone from the disk once closed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.frontend.spool import PIECE, Spool


async def collect(spool: Spool) -> bytes:
    return b"".join([piece async for piece in spool.chunks()])


@pytest.mark.parametrize(
    ("threshold", "sizes", "on_disk"),
    [
        (1024, [100, 200], False),
        (1024, [1024], False),  # exactly the threshold stays in memory
        (1024, [1024, 1], True),
        (0, [1], True),
        (4096, [PIECE + 5, 3, PIECE * 2 + 1], True),
        (4096, [], False),
    ],
)
async def test_spool_keeps_the_bytes_in_order(
    tmp_path: Path, threshold: int, sizes: list[int], on_disk: bool
) -> None:
    spool = Spool(threshold, str(tmp_path))
    parts = [os.urandom(n) for n in sizes]
    for part in parts:
        await spool.write(part)
    assert spool.size == sum(sizes) and spool.on_disk is on_disk
    whole = b"".join(parts)
    assert await collect(spool) == whole
    assert await collect(spool) == whole, "a retry reads it all again"
    if on_disk:
        assert max([len(p) async for p in spool.chunks()]) <= PIECE
    spool.close()
    assert await collect(spool) == b""


async def test_a_closed_spool_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(10, str(tmp_path))
    await spool.write(b"x" * 100)
    assert spool.on_disk
    assert list(tmp_path.iterdir()) == []  # unnamed from the start: nothing to clean up
    spool.close()
    assert not spool.on_disk
