"""Tests of the port allocator: bind test, no double hand-out, quarantine, exhaustion."""

from __future__ import annotations

import socket

import pytest

from corral.errors import NoCapacity
from corral.worker.ports import PortAllocator


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ports_are_distinct_and_in_range() -> None:
    ports = PortAllocator(low=21000, high=21999)
    got = [ports.allocate() for _ in range(50)]
    assert len(set(got)) == 50
    assert all(21000 <= p <= 21999 for p in got)
    assert ports.in_use == frozenset(got)


def test_allocated_port_is_not_handed_out_again_until_released_and_quarantined() -> None:
    clock = FakeClock()
    port = free_port()
    ports = PortAllocator(low=port, high=port, quarantine=5.0, clock=clock)
    assert ports.allocate() == port
    with pytest.raises(NoCapacity):
        ports.allocate()  # still held by a live replica
    ports.release(port)
    assert port not in ports.in_use
    clock.now += 4.9
    with pytest.raises(NoCapacity):
        ports.allocate()  # released too recently
    clock.now += 0.2
    assert ports.allocate() == port


def test_port_bound_by_someone_else_is_skipped() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = PortAllocator(low=taken, high=taken)
        with pytest.raises(NoCapacity, match=f"{taken}-{taken}"):
            ports.allocate()
    assert ports.allocate() == taken  # free again once the other socket closed


def test_allocation_rotates_instead_of_reusing_the_lowest_port() -> None:
    clock = FakeClock()
    ports = PortAllocator(low=22000, high=22999, quarantine=0.0, clock=clock)
    first = ports.allocate()
    ports.release(first)
    assert ports.allocate() != first


def test_release_of_unknown_or_released_port_is_harmless() -> None:
    ports = PortAllocator(low=23000, high=23999)
    ports.release(23500)
    port = ports.allocate()
    ports.release(port)
    ports.release(port)
    assert ports.in_use == frozenset()


def test_invalid_range_is_rejected() -> None:
    with pytest.raises(ValueError):
        PortAllocator(low=3000, high=2000)
