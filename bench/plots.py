"""PNG plots of a bench run (runs in bench/.venv, which has matplotlib):

bench/.venv/bin/python bench/plots.py bench/out/latest.json bench/plots
"""

# ruff: noqa: RUF001 - axis titles use multiplication signs

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "direct": "#555555",
    "corral": "#1f77b4",
    "litellm": "#d62728",
    "vllm-router": "#2ca02c",
    "client round robin": "#9467bd",
    "oracle": "#ff7f0e",
}


def color(name: str) -> str:
    for key, value in COLORS.items():
        if name.startswith(key):
            return value
    return "#8c564b"


def _cdf(ax: Any, samples: dict[str, list[float]], title: str, xlabel: str) -> None:
    for name, values in samples.items():
        if not values:
            continue
        v = sorted(values)
        n = len(v)
        ax.plot(v, [(i + 1) / n for i in range(n)], label=f"{name} (n={n:,})", color=color(name))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _bars(ax: Any, names: list[str], values: list[float], title: str, ylabel: str) -> None:
    bars = ax.bar(names, values, color=[color(n) for n in names])
    for b, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8
        )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)


def main() -> None:
    res = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    w = res["workloads"]
    if "w1" in w:
        fig, ax = plt.subplots(figsize=(8, 5))
        _cdf(
            ax,
            w["w1"]["samples_ms"],
            "Workload 1: latency at concurrency 1 (all rounds)",
            "latency (ms, log scale)",
        )
        fig.tight_layout()
        fig.savefig(out / "latency_w1.png", dpi=110)
        plt.close(fig)
    if "w2" in w:
        m = w["w2"]["median"]
        names = list(m)
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
        _bars(
            a,
            names,
            [m[n]["rps"] for n in names],
            "Workload 2: throughput, concurrency 64",
            "requests/s (median of rounds)",
        )
        _bars(
            b,
            names,
            [m[n]["rps_per_core"] or 0 for n in names],
            "requests/s per CPU core of the proxy (direct: of the sim)",
            "requests/s per core",
        )
        fig.tight_layout()
        fig.savefig(out / "throughput_w2.png", dpi=110)
        plt.close(fig)
    if "w3" in w:
        m = w["w3"]["median"]
        names = list(m)
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
        _bars(
            a,
            names,
            [m[n]["chunks_per_s"] for n in names],
            "Workload 3: SSE chunks/s relayed, 64 streams",
            "chunks/s (median of rounds)",
        )
        _cdf(b, w["w3"].get("ttfb_samples_ms", {}), "time to first chunk", "ms (log scale)")
        fig.tight_layout()
        fig.savefig(out / "streaming_w3.png", dpi=110)
        plt.close(fig)
    if "w4" in w and "samples_ms" in w["w4"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        _cdf(
            ax,
            w["w4"]["samples_ms"],
            "Workload 4: balance with one 3× slower replica",
            "latency (ms, log scale)",
        )
        fig.tight_layout()
        fig.savefig(out / "balance_w4.png", dpi=110)
        plt.close(fig)
    if "w6" in w and "series_rps" in w["w6"]:
        r = w["w6"]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        xs = [i * r["bucket_s"] for i in range(len(r["series_rps"]))]
        ax.plot(
            xs, r["series_rps"], label="successful req/s (0.5 s buckets)", color=COLORS["corral"]
        )
        ax.axvline(r["kill_at_s"], color="red", linestyle="--", label=f"SIGKILL {r['victim']}")
        if r.get("failed_at_s"):
            ax.plot(r["failed_at_s"], [0] * len(r["failed_at_s"]), "rx", label="failed requests")
        ax2 = ax.twinx()
        ax2.step(
            [t for t, _ in r["replica_samples"]],
            [n for _, n in r["replica_samples"]],
            where="post",
            color="#ff7f0e",
            label="loaded replicas",
        )
        ax2.set_ylim(0, 4)
        ax2.set_ylabel("loaded replicas")
        ax.set_xlabel("seconds")
        ax.set_ylabel("requests/s")
        ax.set_title("Workload 6: recovery after losing one of three workers")
        ax.legend(loc="lower left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "recovery_w6.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
