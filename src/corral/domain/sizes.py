"""Parsing and formatting of byte sizes ("12GB", "512MiB") and memory budgets ("80%", "12GB")."""

from __future__ import annotations

import re
from dataclasses import dataclass

INT32_MAX = 2**31 - 1  # what PostgreSQL `integer` holds: replica indexes and counts
INT64_MAX = 2**63 - 1  # what PostgreSQL `bigint` holds: sizes in bytes

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Return a byte count for `value` (an int, or a string like "12GB", "512MiB", "1.5g").

    Raises ValueError with a readable message for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"size must be finite: {value!r}")
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (expected e.g. 512MB, 12GB, 8GiB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {value!r}")
    return int(float(number) * factor)


def format_size(n: int) -> str:
    """Return a short human form of a byte count, e.g. 1.5 GB."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """How much of a node's memory Corral may fill: a fraction of the total or a fixed size."""

    fraction: float | None = None  # e.g. 0.8 for "80%"; None when `size` is set
    size: int | None = None  # bytes; None when `fraction` is set

    @classmethod
    def parse(cls, value: str | int | float) -> MemoryBudget:
        """Parse "80%" or "12GB" (or a byte count)."""
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                pct = float(value.strip()[:-1])
            except ValueError:
                raise ValueError(f"not a percentage: {value!r}") from None
            if not 0 < pct <= 100:
                raise ValueError(f"percentage must be in (0, 100]: {value!r}")
            return cls(fraction=pct / 100)
        return cls(size=parse_size(value))

    def bytes_of(self, total: int) -> int:
        """Return the budget in bytes for a node with `total` bytes of memory."""
        if self.size is not None:
            return min(self.size, total) if total > 0 else self.size
        return int(total * (self.fraction if self.fraction is not None else 1.0))

    def __str__(self) -> str:
        if self.size is not None:
            return format_size(self.size)
        return f"{(self.fraction or 1.0) * 100:g}%"
