"""`Spool`: a request body kept for forwarding, and resending on a retry: in memory up to a
threshold, in an unnamed temporary file beyond (so a large upload costs disk, not memory).

File writes and reads run in a worker thread in pieces of `PIECE` bytes, so the event loop
never waits on the disk and memory stays bounded by the threshold plus one piece.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from typing import IO

#: Bytes moved to or from the file per thread hop.
PIECE = 256 * 1024


class Spool:
    """Bytes written once, read any number of times (`chunks()`), then `close()`d."""

    def __init__(self, threshold: int, directory: str | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self.size = 0
        self._memory = bytearray()  # everything, until the threshold; then what awaits writing
        self._file: IO[bytes] | None = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None:
            if len(self._memory) + len(data) <= self.threshold:
                self._memory += data
                return
            self._file = await asyncio.to_thread(
                tempfile.TemporaryFile, "w+b", buffering=0, dir=self.directory
            )
            if self._memory:
                await self._flush()
        if not self._memory and len(data) >= PIECE:  # big enough to go as it is: no copy
            await asyncio.to_thread(_write_all, self._file, data)
            return
        self._memory += data
        if len(self._memory) >= PIECE:
            await self._flush()

    async def _flush(self) -> None:
        assert self._file is not None
        pending, self._memory = self._memory, bytearray()  # handed over, not copied
        await asyncio.to_thread(_write_all, self._file, pending)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes, from the start, in pieces (each call starts over)."""
        if self._file is None:
            if self._memory:
                yield bytes(self._memory)
            return
        if self._memory:
            await self._flush()
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            piece = await asyncio.to_thread(os.pread, fd, min(PIECE, self.size - offset), offset)
            if not piece:
                raise OSError(f"spool file ended at {offset} of {self.size} bytes")
            offset += len(piece)
            yield piece

    def close(self) -> None:
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_all(file: IO[bytes], data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written or 0 :]
