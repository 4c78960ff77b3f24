"""Prompt-prefix block hashes and the approximate index of which replicas recently served them.

Hashing: `block_hashes(data)` cuts the routing-relevant bytes of a request (the rendered
`messages` or `prompt`; the caller produces them) into whole blocks of `block_bytes` (default
256 bytes, about 64 tokens at 4 bytes a token; a trailing partial block does not count) and
returns one hash per block, at most `max_blocks` of them. Hash i is the CRC-32 of bytes
`[0, (i + 1) * block_bytes)` (chained: `zlib.crc32(block, previous)`), with the block count in
the high bits, so a hash stands for its whole prefix and equal prefixes hash alike in every
process (Python's own `hash` of bytes is salted per process, so frontends could not share it).
CRC-32 is not collision-proof against a crafted prompt; the worst a collision can do here is
mis-score affinity (routing, never data). Cost: ~8 us of CPU for an 8 KB prompt on the 2-core
dev machine, the Python loop's floor (bench/route_bench.py).

Index: `PrefixIndex` maps a block hash to the replicas that recently served a request with that
prefix and when. It is bounded (`max_entries` hashes, least recently touched dropped first;
`max_replicas` per hash), entries older than `ttl` do not count, and it is pure (every call
takes `now`). Call contract for a frontend:

- per routed request: `match(hashes, now)` before the pick -> `{replica: matched fraction}`
  (matched blocks / request blocks), the prefix scorer's input; `record(replica, hashes, now)`
  after the pick (a local observation; also queued for export);
- every few hundred milliseconds: `export()` -> a `PrefixBatch` (or None) to broadcast;
  on a batch from another frontend: `merge(batch, now)`;
- when a replica goes away: `forget(replica, now)` (its entries stop counting at once, so a new
  replica that reuses its index does not inherit a warm cache it does not have).

Hashes of one request are written longest prefix first, so the shorter prefixes are the more
recently touched: eviction drops long prefixes first, and `match` can stop at the first block
no live replica served. A hash the replica already holds from less than `refresh` seconds ago
is only read (no write, no LRU move, not exported again), so the shared part of a hot prompt
costs a lookup per block; every hash of a prompt in use stays within `refresh` of fresh.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from corral.domain.entities import ReplicaKey

BLOCK_BYTES = 256
MAX_BLOCKS = 128
_NEVER = float("-inf")


def block_hashes(
    data: bytes, block_bytes: int = BLOCK_BYTES, max_blocks: int = MAX_BLOCKS
) -> list[int]:
    """Chained hashes of the whole `block_bytes` blocks of `data` (at most `max_blocks`)."""
    n = min(len(data) // block_bytes, max_blocks)
    crc32 = zlib.crc32
    out = [0] * n
    c = 0
    end = 0
    for i in range(n):
        start = end
        end += block_bytes
        c = crc32(data[start:end], c)
        out[i] = (i + 1) << 32 | c
    return out


@dataclass(frozen=True, slots=True)
class PrefixBatch:
    """Observations one frontend broadcasts: replica (model, index) -> hashes it served.

    `at` is when the newest observation was made (the sender's clock); receivers use
    min(at, their now), so a sender running ahead cannot make entries live longer.
    Plain strings, ints and tuples, so the bus serializes it without a schema of its own.
    """

    at: float
    items: tuple[tuple[str, int, tuple[int, ...]], ...]


class PrefixIndex:
    """Bounded, TTL'd map of prefix block hash -> {replica: last seen} (contract in module doc)."""

    def __init__(
        self,
        max_entries: int = 65_536,
        ttl: float = 300.0,
        max_replicas: int = 8,
        refresh: float = 5.0,
        max_export: int = 8_192,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.max_replicas = max_replicas
        self.refresh = refresh
        self.max_export = max_export
        self._entries: OrderedDict[int, dict[ReplicaKey, float]] = OrderedDict()
        self._gone: dict[ReplicaKey, float] = {}  # forgotten replica -> when
        self._outbox: dict[ReplicaKey, list[int]] = {}
        self._outbox_size = 0
        self._outbox_at = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: Sequence[int], now: float) -> dict[ReplicaKey, float]:
        """Replica -> fraction of the request's blocks it served last (0 < f <= 1).

        Scans from the shortest prefix and stops at the first block no live replica served.
        """
        n = len(hashes)
        if not n:
            return {}
        entries = self._entries
        gone = self._gone
        cutoff = now - self.ttl
        matched: dict[ReplicaKey, int] = {}
        for i, h in enumerate(hashes):
            entry = entries.get(h)
            if entry is None:
                break
            live = False
            for r, t in entry.items():
                if t >= cutoff and (not gone or t > gone.get(r, _NEVER)):
                    matched[r] = i + 1
                    live = True
            if not live:
                break
        return {r: m / n for r, m in matched.items()}

    def record(self, replica: ReplicaKey, hashes: Sequence[int], now: float) -> None:
        """This frontend sent a request with these block hashes to `replica` at `now`."""
        written = self._touch(replica, hashes, now)
        if not written or self._outbox_size >= self.max_export:
            return
        written.reverse()  # shortest first: `merge` replays a list backwards, longest first
        self._outbox.setdefault(replica, []).extend(written)
        self._outbox_size += len(written)
        self._outbox_at = max(self._outbox_at, now)

    def export(self) -> PrefixBatch | None:
        """The observations recorded since the last export (None when there are none)."""
        if not self._outbox:
            return None
        batch = PrefixBatch(
            self._outbox_at, tuple((m, i, tuple(hs)) for (m, i), hs in self._outbox.items())
        )
        self._outbox = {}
        self._outbox_size = 0
        return batch

    def merge(self, batch: PrefixBatch, now: float) -> None:
        """Fold in another frontend's observations (not queued for export again)."""
        at = min(batch.at, now)
        for model, index, hashes in batch.items:  # each list is replayed backwards
            self._touch((model, index), hashes, at, skip_fresh=False)

    def forget(self, replica: ReplicaKey, now: float) -> None:
        """`replica` went away: what it served before `now` no longer counts."""
        cutoff = now - self.ttl
        self._gone = {r: t for r, t in self._gone.items() if t >= cutoff}
        self._gone[replica] = now
        dropped = self._outbox.pop(replica, None)
        if dropped:
            self._outbox_size -= len(dropped)

    def _touch(
        self, replica: ReplicaKey, hashes: Sequence[int], now: float, *, skip_fresh: bool = True
    ) -> list[int]:
        """Set `replica` to `now` on each hash, longest first; return the hashes written.

        With `skip_fresh`, a hash the replica holds from less than `refresh` ago is left alone
        (a read instead of a write, and not exported again).
        """
        entries = self._entries
        fresh_after = now - self.refresh if skip_fresh else now
        forgotten = self._gone.get(replica)
        if forgotten is not None and forgotten >= fresh_after:
            fresh_after = forgotten + 1e-9  # what it held before it was forgotten is not fresh
        cap = self.max_replicas
        written: list[int] = []
        for h in reversed(hashes):
            entry = entries.get(h)
            if entry is None:
                entries[h] = {replica: now}
            else:
                seen = entry.get(replica)
                if seen is not None and seen >= fresh_after:
                    continue
                if seen is not None:
                    del entry[replica]  # re-insert: entries keep their replicas oldest first
                entry[replica] = now
                if len(entry) > cap:
                    del entry[next(iter(entry))]
                entries.move_to_end(h)
            written.append(h)
        self._trim(now)
        return written

    def _trim(self, now: float) -> None:
        """Drop least recently touched hashes past `max_entries`, and expired ones in front."""
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        cutoff = now - self.ttl
        for _ in range(4):  # amortized: a few expired ones per call
            if not entries:
                break
            h = next(iter(entries))
            if max(entries[h].values()) >= cutoff:
                break
            del entries[h]
