"""Prompt-prefix block hashes and the prefix index: matching, bounds, TTL, export/merge, forget."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from corral.domain.entities import ReplicaKey
from corral.domain.prefix import BLOCK_BYTES, PrefixBatch, PrefixIndex, block_hashes

RNG = random.Random(3)
HEAD = RNG.randbytes(8 * BLOCK_BYTES)
A: ReplicaKey = ("m", 0)
B: ReplicaKey = ("m", 1)


def prompt(blocks: int, head: bytes = HEAD, tail_seed: int = 0) -> bytes:
    tail = random.Random(tail_seed).randbytes(max(0, blocks * BLOCK_BYTES - len(head)))
    return (head + tail)[: blocks * BLOCK_BYTES]


# --- hashing ------------------------------------------------------------------------------

HASHING = [
    ("empty", b"", 0),
    ("partial-block-ignored", b"x" * (BLOCK_BYTES - 1), 0),
    ("one-block", b"x" * BLOCK_BYTES, 1),
    ("trailing-partial-ignored", b"x" * (3 * BLOCK_BYTES + 10), 3),
    ("capped", b"x" * (500 * BLOCK_BYTES), 128),
]


@pytest.mark.parametrize(("data", "count"), [c[1:] for c in HASHING], ids=[c[0] for c in HASHING])
def test_block_count(data: bytes, count: int) -> None:
    assert len(block_hashes(data)) == count


def test_hashes_are_chained_over_the_whole_prefix() -> None:
    a = block_hashes(prompt(8))
    other_head = bytearray(HEAD)
    other_head[0] ^= 1  # differs in the first byte only
    b = block_hashes(prompt(8, bytes(other_head)))
    assert all(x != y for x, y in zip(a, b, strict=True))  # every block depends on block 0
    # a shared head gives shared hashes up to where the prompts part
    c = block_hashes(HEAD[: 5 * BLOCK_BYTES] + b"y" * 3 * BLOCK_BYTES)
    assert a[:5] == c[:5] and a[5:] != c[5:]


def test_same_block_at_another_position_hashes_differently() -> None:
    block = b"z" * BLOCK_BYTES
    h = block_hashes(block * 4)
    assert len(set(h)) == 4


def test_hashes_agree_across_processes() -> None:
    # what frontends exchange must not depend on Python's per-process hash salt
    code = "from corral.domain.prefix import block_hashes; print(block_hashes(b'q' * 1024))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert other == str(block_hashes(b"q" * 1024))


def test_custom_block_size_and_cap() -> None:
    assert len(block_hashes(b"x" * 100, block_bytes=10, max_blocks=4)) == 4


# --- matching -----------------------------------------------------------------------------


def test_match_is_the_fraction_of_blocks_served() -> None:
    idx = PrefixIndex()
    idx.record(A, block_hashes(prompt(8)), now=0.0)
    idx.record(B, block_hashes(prompt(4)), now=0.0)
    got = idx.match(block_hashes(prompt(8)), now=1.0)
    assert got == {A: 1.0, B: 0.5}
    # a request sharing only the first 2 blocks with both
    part = block_hashes(HEAD[: 2 * BLOCK_BYTES] + b"n" * 6 * BLOCK_BYTES)
    assert idx.match(part, now=1.0) == {A: 0.25, B: 0.25}


def test_match_of_unknown_or_empty_is_empty() -> None:
    idx = PrefixIndex()
    idx.record(A, block_hashes(prompt(4)), now=0.0)
    assert idx.match(block_hashes(b"other" * 1000), now=0.0) == {}
    assert idx.match([], now=0.0) == {}


def test_ttl_expires_matches() -> None:
    idx = PrefixIndex(ttl=10.0)
    idx.record(A, block_hashes(prompt(4)), now=0.0)
    assert idx.match(block_hashes(prompt(4)), now=10.0) == {A: 1.0}
    assert idx.match(block_hashes(prompt(4)), now=10.5) == {}


def test_hot_prefix_stays_fresh_while_the_conversation_grows() -> None:
    # each turn adds blocks; the head must not expire while it is in use
    idx = PrefixIndex(ttl=10.0, refresh=2.0)
    for turn in range(40):
        idx.record(A, block_hashes(prompt(4 + turn % 4, tail_seed=turn)), now=float(turn))
    assert idx.match(block_hashes(prompt(4)), now=40.0) == {A: 1.0}


def test_bounded_entries_drop_the_longest_prefixes_first() -> None:
    idx = PrefixIndex(max_entries=6)
    idx.record(A, block_hashes(prompt(8)), now=0.0)
    assert len(idx) == 6
    # the shortest prefixes survive, so a match still finds the head
    assert idx.match(block_hashes(prompt(8)), now=0.0) == {A: 6 / 8}


def test_replicas_per_hash_are_capped_oldest_out() -> None:
    idx = PrefixIndex(max_replicas=2)
    h = block_hashes(prompt(1))
    for i in range(4):
        idx.record(("m", i), h, now=float(i))
    assert set(idx.match(h, now=4.0)) == {("m", 2), ("m", 3)}


def test_expired_entries_are_dropped_from_memory() -> None:
    idx = PrefixIndex(ttl=5.0)
    for i in range(3):
        idx.record(A, block_hashes(bytes([i]) * BLOCK_BYTES), now=0.0)
    for i in range(10):  # later traffic sweeps the expired front
        idx.record(B, block_hashes(bytes([i + 10]) * BLOCK_BYTES), now=100.0)
    assert len(idx) == 10


# --- forget ------------------------------------------------------------------------------


def test_forget_stops_matching_and_a_reused_index_starts_cold() -> None:
    idx = PrefixIndex()
    h = block_hashes(prompt(4))
    idx.record(A, h, now=0.0)
    idx.record(B, h, now=0.0)
    idx.forget(A, now=1.0)
    assert idx.match(h, now=1.0) == {B: 1.0}
    # a new replica with A's key serves it later: counts again
    idx.record(A, h[:2], now=2.0)
    assert idx.match(h, now=2.0) == {B: 1.0, A: 0.5}


def test_forget_drops_unsent_observations() -> None:
    idx = PrefixIndex()
    idx.record(A, block_hashes(prompt(2)), now=0.0)
    idx.forget(A, now=0.0)
    assert idx.export() is None


# --- export / merge ----------------------------------------------------------------------


def test_export_then_merge_reproduces_matches_elsewhere() -> None:
    here, there = PrefixIndex(), PrefixIndex()
    h8 = block_hashes(prompt(8))
    here.record(A, h8, now=5.0)
    here.record(B, block_hashes(prompt(3)), now=5.0)
    batch = here.export()
    assert batch is not None and batch.at == 5.0
    there.merge(batch, now=6.0)
    assert there.match(h8, now=6.0) == here.match(h8, now=6.0) == {A: 1.0, B: 3 / 8}
    assert here.export() is None  # the outbox was emptied
    assert there.export() is None  # merged observations are not re-broadcast


def test_export_is_incremental_and_compact() -> None:
    idx = PrefixIndex(refresh=5.0)
    h = block_hashes(prompt(8))
    idx.record(A, h, now=0.0)
    first = idx.export()
    assert first is not None and sum(len(x[2]) for x in first.items) == 8
    idx.record(A, h, now=1.0)  # all fresh: nothing new to say
    assert idx.export() is None
    idx.record(A, block_hashes(prompt(8)[: 6 * BLOCK_BYTES] + b"t" * 2 * BLOCK_BYTES), now=1.0)
    second = idx.export()
    assert second is not None and [len(x[2]) for x in second.items] == [2]


def test_export_is_bounded() -> None:
    idx = PrefixIndex(max_export=10)
    for i in range(5):
        idx.record(A, block_hashes(prompt(4, head=bytes([i]) * BLOCK_BYTES)), now=0.0)
    batch = idx.export()
    assert batch is not None and sum(len(x[2]) for x in batch.items) <= 12


def test_merge_never_makes_an_entry_older_or_later_than_now() -> None:
    idx = PrefixIndex(ttl=10.0)
    h = block_hashes(prompt(2))
    idx.record(A, h, now=100.0)
    idx.merge(PrefixBatch(at=50.0, items=(("m", 0, tuple(h)),)), now=100.0)
    assert idx.match(h, now=109.0) == {A: 1.0}  # the newer local time was kept
    # a sender whose clock runs ahead cannot extend the TTL
    idx.merge(PrefixBatch(at=1e9, items=(("m", 1, tuple(h)),)), now=100.0)
    assert idx.match(h, now=111.0) == {}


def test_merged_batch_after_forget_does_not_revive() -> None:
    idx = PrefixIndex()
    h = block_hashes(prompt(2))
    idx.forget(A, now=10.0)
    idx.merge(PrefixBatch(at=9.0, items=(("m", 0, tuple(h)),)), now=11.0)
    assert idx.match(h, now=11.0) == {}
