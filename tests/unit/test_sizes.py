"""Sizes and memory budgets: parsing and formatting."""

from __future__ import annotations

from typing import Any

import pytest

from corral.domain.sizes import MemoryBudget, format_size, parse_size

SIZES: list[tuple[str | int | float, int]] = [
    (0, 0),
    (1234, 1234),
    (12.7, 12),
    ("0", 0),
    ("512", 512),
    ("512B", 512),
    ("1k", 1000),
    ("1KB", 1000),
    ("12GB", 12_000_000_000),
    ("12 gb", 12_000_000_000),
    ("1.5g", 1_500_000_000),
    ("2T", 2_000_000_000_000),
    ("1KiB", 1024),
    ("512MiB", 512 * 1024**2),
    (" 8 GiB ", 8 * 1024**3),
    ("1gi", 1024**3),
    ("1TiB", 1024**4),
]


@pytest.mark.parametrize(("value", "expected"), SIZES, ids=[repr(v) for v, _ in SIZES])
def test_parse_size(value: str | int | float, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "GB", "abc", "12XB", "-1GB", "1e9", "1,5GB", "12 G B", -1, -0.5, True, False],
    ids=repr,
)
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1_500_000_000, "1.5 GB"),
        (5 * 10**15, "5000.0 TB"),
    ],
    ids=["zero", "bytes", "kb", "gb", "tb-cap"],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


BUDGETS: list[tuple[str | int, MemoryBudget, int]] = [
    ("80%", MemoryBudget(fraction=0.8), 80),
    (" 50 % ", MemoryBudget(fraction=0.5), 50),
    ("100%", MemoryBudget(fraction=1.0), 100),
    ("12GB", MemoryBudget(size=12_000_000_000), 100),
    ("50", MemoryBudget(size=50), 50),
    (30, MemoryBudget(size=30), 30),
]


@pytest.mark.parametrize(("text", "budget", "of_100"), BUDGETS, ids=[repr(b[0]) for b in BUDGETS])
def test_memory_budget_parse(text: str | int, budget: MemoryBudget, of_100: int) -> None:
    parsed = MemoryBudget.parse(text)
    assert parsed == budget
    assert parsed.bytes_of(100) == of_100


def test_memory_budget_size_without_known_total() -> None:
    assert MemoryBudget(size=7).bytes_of(0) == 7
    assert MemoryBudget(fraction=0.5).bytes_of(0) == 0


@pytest.mark.parametrize("text", ["0%", "101%", "-5%", "abc%", "%", "lots"], ids=repr)
def test_memory_budget_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        MemoryBudget.parse(text)


@pytest.mark.parametrize(
    ("budget", "text"),
    [(MemoryBudget(fraction=0.8), "80%"), (MemoryBudget(size=12_000_000_000), "12.0 GB")],
    ids=["fraction", "size"],
)
def test_memory_budget_str_roundtrips(budget: MemoryBudget, text: str) -> None:
    assert str(budget) == text
    if budget.fraction is not None:
        assert MemoryBudget.parse(str(budget)) == budget
