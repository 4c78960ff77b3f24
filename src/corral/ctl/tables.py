"""Plain-text tables with a header row, and the cell formats the operator commands share."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import typer


def render(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart under an upper-case header; an empty cell is "-"."""
    cells = [[str(h).upper() for h in headers]]
    cells += [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def show(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    typer.echo(render(headers, rows))


def ago(at: float | None, now: float | None = None) -> str:
    """How long ago `at` (epoch seconds) was: "5s ago", "3m ago", "2h ago", "4d ago"."""
    if not at:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.1f}G"


def pairs(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def clock(at: float) -> str:
    """An event's time, local, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def last_line(text: str | None) -> str:
    """The last non-empty line of an error text (a traceback's ends with the error)."""
    lines = (text or "").strip().splitlines()
    return lines[-1].strip() if lines else ""
