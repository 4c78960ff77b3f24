"""Tables, target verdicts and the RESULTS.md text from a results dict; profile summaries."""

# ruff: noqa: RUF001, RUF005 - tables use multiplication signs and dashes

from __future__ import annotations

import math
from collections import Counter
from typing import Any

ORDER = ["direct", "corral", "litellm", "vllm-router"]


def _order(measured: dict[str, Any]) -> list[str]:
    """Targets in table order: the usual four, Corral's server variants after Corral."""
    extra = sorted(t for t in measured if t not in ORDER)
    return [t for t in ORDER[:2] if t in measured] + extra + [t for t in ORDER[2:] if t in measured]


BG = "other load (cores)"  # CPU used meanwhile by processes the bench did not start


def _f(v: Any, digits: int = 2, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v}{unit}"


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def tables(res: dict[str, Any]) -> list[str]:
    w = res.get("workloads", {})
    lines: list[str] = []
    if "w1" in w:
        m = w["w1"]["median"]
        d = m.get("direct", {})
        lines += [
            f"**1. Added latency, concurrency 1** ({w['w1']['requests']:,} non-streaming "
            f"requests per round; medians of {len(w['w1']['rounds'])} rounds)",
            "",
        ]
        rows = []
        for t in _order(m):
            if t in m:
                x = m[t]
                add50 = x["p50_ms"] - d["p50_ms"] if t != "direct" else None
                add99 = x["p99_ms"] - d["p99_ms"] if t != "direct" else None
                rows.append(
                    [
                        t,
                        _f(x["p50_ms"], 3),
                        _f(x["p99_ms"], 3),
                        _f(add50, 3),
                        _f(add99, 3),
                        _f(x["errors"], 0),
                        _f(x.get("background_cores"), 2),
                    ]
                )
        lines += _table(
            ["target", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "errors", BG], rows
        ) + [""]
    if "w2" in w:
        m = w["w2"]["median"]
        d = m.get("direct", {})
        lines += [
            f"**2. Throughput, concurrency 64, {w['w2']['seconds']:g} s** (CPU: the proxy "
            "process; for direct, the sim)",
            "",
        ]
        rows = []
        for t in _order(m):
            if t in m:
                x = m[t]
                rows.append(
                    [
                        t,
                        _f(x["rps"], 0),
                        _f(_ratio(x["rps"], d.get("rps")), 2),
                        _f(x["cpu_cores"], 2),
                        _f(x["rps_per_core"], 0),
                        _f(1e6 / x["rps_per_core"] if x.get("rps_per_core") else None, 1),
                        _f(x["p50_ms"], 2),
                        _f(x["p99_ms"], 2),
                        _f(x["errors"], 0),
                        _f(x.get("background_cores"), 2),
                    ]
                )
        lines += _table(
            [
                "target",
                "req/s",
                "× direct",
                "CPU cores",
                "req/s per core",
                "own CPU µs/req",
                "p50 ms",
                "p99 ms",
                "errors",
                BG,
            ],
            rows,
        ) + [""]
    if "w3" in w:
        m = w["w3"]["median"]
        d = m.get("direct", {})
        lines += [
            f"**3. Streaming, 64 concurrent streams of 100 chunks (5 ms apart), "
            f"{w['w3']['seconds']:g} s** (chunks = SSE events)",
            "",
        ]
        rows = []
        for t in _order(m):
            if t in m:
                x = m[t]
                add = x["ttfb_p50_ms"] - d["ttfb_p50_ms"] if t != "direct" else None
                rows.append(
                    [
                        t,
                        _f(x["chunks_per_s"], 0),
                        _f(_ratio(x["chunks_per_s"], d.get("chunks_per_s")), 3),
                        _f(x["events_per_stream"], 1),
                        _f(x["ttfb_p50_ms"], 2),
                        _f(add, 2),
                        _f(x["ttfb_p99_ms"], 2),
                        _f(x["cpu_cores"], 2),
                        _f(x["errors"], 0),
                        _f(x.get("background_cores"), 2),
                    ]
                )
        lines += _table(
            [
                "target",
                "chunks/s",
                "× direct",
                "events/stream",
                "first chunk p50 ms",
                "added p50 ms",
                "first chunk p99 ms",
                "CPU cores",
                "errors",
                BG,
            ],
            rows,
        ) + [""]
    if "w4" in w:
        b = w["w4"]
        if "median" in b:
            m = b["median"]
            o = m.get("oracle", {})
            svc = "/".join(f"{x:.0f}" for x in b["service_ms"])
            lines += [
                f"**4. Balance: 3 replicas ({svc} ms per answer, {b['slots']} slots each), "
                f"{b['users']} closed-loop users, {b['seconds']:g} s**",
                "",
            ]
            if b.get("pending"):
                lines += [f"Corral: pending — {b['pending']}", ""]
            rows = []
            for t, x in m.items():
                rows.append(
                    [
                        t,
                        _f(x["p50_ms"], 1),
                        _f(x["p99_ms"], 1),
                        _f(_ratio(x["p99_ms"], o.get("p99_ms")), 2),
                        _f(x["rps"], 0),
                        _f(x["slow_share"] * 100, 1),
                        _f(x["errors"], 0),
                        _f(x.get("background_cores"), 2),
                    ]
                )
            lines += _table(
                [
                    "target",
                    "p50 ms",
                    "p99 ms",
                    "p99 × oracle",
                    "req/s",
                    "% to slow replica",
                    "errors",
                    BG,
                ],
                rows,
            ) + [""]
    if "w5" in w:
        c = w["w5"]
        m = c["median"]
        lines += [
            f"**5. Cold start** (first request for an unloaded model → first streamed byte; "
            f"the sim loads for {c['load_time_s']:g} s; medians of {len(c['loads'])})",
            "",
        ]
        per_load = ", ".join(f"{x['overhead_ms']:.0f}" for x in c["loads"])
        lines += _table(
            ["", "value"],
            [
                ["Corral: request → first byte (median)", _f(m["corral_s"], 3, " s")],
                ["sim alone: spawn → healthy → first byte (median)", _f(m["direct_s"], 3, " s")],
                [
                    "Corral overhead, per load (Corral minus the sim alone just after)",
                    per_load + " ms",
                ],
                [
                    "Corral overhead, median of the per-load differences",
                    _f(cold_overhead(c), 0, " ms"),
                ],
            ],
        ) + [""]
    if "w6" in w:
        r = w["w6"]
        lines += ["**6. Recovery: SIGKILL one of three workers (and its backend) under load**", ""]
        if r.get("pending"):
            lines += [f"pending — {r['pending']}", ""]
        else:
            lines += _table(
                ["", "value"],
                [
                    [
                        "users / duration",
                        f"{r['users']} / {r['seconds']:.0f} s, kill at "
                        f"{r['kill_at_s']:.1f} s ({r['victim']})",
                    ],
                    ["requests ok", _f(r["ok"], 0)],
                    ["failed requests", f"{r['failed']} {r['error_kinds'] or ''}"],
                    ["throughput before the kill", _f(r["pre_kill_rps"], 0, " req/s")],
                    ["registry shows the loss after", _f(r["replicas_dropped_s"], 1, " s")],
                    ["3 replicas loaded again after", _f(r["replicas_back_s"], 1, " s")],
                    ["throughput ≥ 90 % again after", _f(r["throughput_back_s"], 1, " s")],
                ],
            ) + [""]
    if "w7" in w:
        s = w["w7"]
        rt, reg = s["routing"], s["registry"]
        lines += [
            f"**7. Scale in simulation: {rt['nodes']:,} nodes, {rt['replicas']:,} replicas** "
            "(real `ClusterView.candidates` + `pick_replica`; real `Registry` on PostgreSQL)",
            "",
        ]
        lines += _table(
            ["measure", "value"],
            [
                [
                    "routing decision, 1,000 models × 10 replicas (cached candidates)",
                    _f(rt["spread"]["us"], 1, " µs"),
                ],
                [
                    "routing decision after a change (candidates rebuilt), 10 replicas",
                    _f(rt["spread_after_change"]["us"], 1, " µs"),
                ],
                [
                    "routing decision, 1 model × 10,000 replicas (cached)",
                    _f(rt["one_model"]["us"], 0, " µs"),
                ],
                [
                    "routing decision after a change, 1 model × 10,000 replicas",
                    _f(rt["one_model_after_change"]["us"], 0, " µs"),
                ],
                *_churn_rows(rt),
                ["node heartbeats written (16 writers)", _f(reg["heartbeats_per_s"], 0, " /s")],
                ["last-used touch, batch of 1,000", _f(reg["touch_1000_s"] * 1e3, 1, " ms")],
                ["last-used touch, batch of 10,000", _f(reg["touch_10000_s"] * 1e3, 1, " ms")],
                ["  = replica rows per second", _f(reg["touch_10000_rows_per_s"], 0, " /s")],
                [
                    "full view resync from PostgreSQL (1,000 nodes, 10,000 replicas)",
                    _f(reg["resync_s"] * 1e3, 0, " ms"),
                ],
            ],
        ) + [""]
    if "w8" in w:
        lines += _scaling_lines(w["w8"])
    return lines


def _scaling_lines(w8: dict[str, Any]) -> list[str]:
    import scaling

    return [
        f"**8. Scaling over cores: Corral with N frontend processes, vllm-router on N cores** "
        f"({w8['sims']} sim replicas, {w8['loaders']} load generator processes, 64 users per "
        f"process, {w8['seconds']:g} s per run, medians of the rounds; {w8['cores']} cores, "
        f"{'each target pinned to its N cores' if w8['pinned'] else 'not pinned'})",
        "",
        *scaling.table(w8),
        "",
    ]


def _churn_rows(rt: dict[str, Any]) -> list[list[str]]:
    """Routing under heartbeat churn (absent from runs before the churn case existed)."""
    rows = []
    for base, shape in (("spread", "1,000 models × 10"), ("one_model", "1 model × 10,000")):
        c = rt.get(f"{base}_churn")
        if c is None:
            continue
        before = rt.get(f"{base}_churn_before", {}).get("us")
        rows.append(
            [
                f"routing decision, {shape}, 1,000 nodes heartbeating "
                f"({c['heartbeats_per_s']}/s at {c['requests_per_s']:,} req/s) "
                "vs no heartbeats",
                f"{_f(c['us'], 1, ' µs')} vs {_f(rt[f'{base}_quiet']['us'], 1, ' µs')} "
                f"({_f(c['ratio'], 3)}×; before the incremental view: {_f(before, 0, ' µs')})",
            ]
        )
    return rows


def cold_overhead(w5: dict[str, Any]) -> float:
    """Median over loads of (Corral - the sim alone measured right after): paired, so slow
    minutes of a shared machine cancel out."""
    diffs = sorted(x["overhead_ms"] for x in w5["loads"])
    n = len(diffs)
    return diffs[n // 2] if n % 2 else (diffs[n // 2 - 1] + diffs[n // 2]) / 2


def verdicts(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target of issue 6; met None = not measured."""
    w = res.get("workloads", {})
    out: list[tuple[str, str, bool | None]] = []
    if "w1" in w:
        m = w["w1"]["median"]
        a50 = m["corral"]["p50_ms"] - m["direct"]["p50_ms"]
        a99 = m["corral"]["p99_ms"] - m["direct"]["p99_ms"]
        out.append(("added latency p50 ≤ 0.5 ms", f"{a50:.3f} ms", a50 <= 0.5))
        out.append(("added latency p99 ≤ 2 ms", f"{a99:.3f} ms", a99 <= 2.0))
    if "w2" in w:
        m = w["w2"]["median"]
        c, cc = m["corral"]["rps"], m["corral"].get("rps_per_core")
        for other, want in (("litellm", 3.0), ("vllm-router", 0.5)):
            if other not in m:
                continue
            raw = c / m[other]["rps"]
            per_core = _ratio(cc, m[other].get("rps_per_core"))
            label = "LiteLLM" if other == "litellm" else other
            out.append(
                (
                    f"throughput per frontend process ≥ {want:g}× {label} (req/s per CPU core)",
                    f"{_f(per_core, 2)}× (raw req/s: {raw:.2f}×)",
                    per_core is not None and per_core >= want,
                )
            )
    if "w3" in w:
        m = w["w3"]["median"]
        r = m["corral"]["chunks_per_s"] / m["direct"]["chunks_per_s"]
        out.append(("streaming relay ≥ 90 % of direct chunks/s", f"{r * 100:.1f} %", r >= 0.9))
    if "w4" in w:
        b = w["w4"]
        m = b.get("median", {})
        if b.get("pending") or "corral" not in m:
            out.append(
                (
                    "balance p99 ≤ 1.2× oracle and better than round robin",
                    "pending: " + str(b.get("pending")),
                    None,
                )
            )
        else:
            c, o = m["corral"]["p99_ms"], m["oracle"]["p99_ms"]
            rr = min(x["p99_ms"] for k, x in m.items() if "round robin" in k)
            out.append(
                ("balance p99 ≤ 1.2× oracle", f"{c / o:.2f}× ({c:.1f} vs {o:.1f} ms)", c <= 1.2 * o)
            )
            out.append(("balance p99 better than round robin", f"{c:.1f} vs {rr:.1f} ms", c < rr))
    if "w5" in w:
        o = cold_overhead(w["w5"])
        out.append(
            ("cold-start overhead ≤ 200 ms", f"{o:.0f} ms (median of paired loads)", o <= 200)
        )
    if "w6" in w:
        r = w["w6"]
        if r.get("pending"):
            out.append(("recovery (no target; reported)", "pending", None))
        else:
            out.append(("recovery: failed requests (reported)", str(r["failed"]), None))
    if "w7" in w:
        us = w["w7"]["routing"]["spread"]["us"]
        worst = w["w7"]["routing"]["one_model"]["us"]
        out.append(
            (
                "routing decision ≤ 50 µs at 10,000 replicas (1,000 models × 10)",
                f"{us:.1f} µs",
                us <= 50,
            )
        )
        out.append(
            ("… same with all 10,000 replicas in one model", f"{worst:,.0f} µs", worst <= 50)
        )
        for base in ("spread", "one_model"):
            c = w["w7"]["routing"].get(f"{base}_churn")
            if c is not None:
                out.append(
                    (
                        f"routing with 1,000 nodes heartbeating ≤ 1.05× quiet ({base})",
                        f"{c['ratio']:.3f}×",
                        c["ratio"] <= 1.05,
                    )
                )
    return out


def _verdict_lines(res: dict[str, Any]) -> list[str]:
    rows = []
    for name, value, met in verdicts(res):
        mark = "met" if met else ("—" if met is None else "**missed**")
        rows.append([name, value, mark])
    return _table(["target", "measured", "verdict"], rows)


def console(res: dict[str, Any]) -> str:
    return "\n".join(tables(res) + ["**Targets**", ""] + _verdict_lines(res))


def results_md(res: dict[str, Any]) -> str:
    meta = res["meta"]
    v = meta["versions"]
    mach = meta["machine"]
    lines = [
        "# Corral benchmark results",
        "",
        "Written by `bench/run.py`; see bench/README.md for what each workload does and how.",
        "",
        f"- command: `{meta['command']}` ({meta['mode']} mode, {meta['rounds']} alternating rounds "
        f"A B C D …; wall time {meta.get('wall_seconds', '?')} s)",
        f"- run: {meta['stamp']}",
        f"- versions: corral {v.get('corral')}, LiteLLM {v.get('litellm')}, vllm-router "
        f"{v.get('vllm-router')}, Python {v.get('python')} (uvicorn {v.get('uvicorn')}, uvloop "
        f"{v.get('uvloop')}, httptools {v.get('httptools')})",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM, Linux "
        f"{mach['kernel']}",
        "- pinning: "
        + (
            "the proxy under test on core 1; the load generator, the sim backends, "
            "PostgreSQL, NATS and the workers on core 0 (direct runs leave core 1 idle)"
            if meta["pinned"]
            else "none"
        ),
        f"- source: commit {meta.get('source', {}).get('commit', '?')}, "
        f"{meta.get('source', {}).get('src_changes', '?')} uncommitted change(s) under src/ "
        f"(other engineers edit src/ while the bench runs); frontend log lines written in "
        f"phase A: {meta.get('frontend_log_lines_phase_a', '?')} (log level WARNING: should be ~0)",
        "",
        "## Targets",
        "",
        *_verdict_lines(res),
        "",
        "## Results",
        "",
        *tables(res),
    ]
    if res.get("profile"):
        lines += [
            "## Profile of the frontend under workload 2 (py-spy)",
            "",
            *profile_lines(res["profile"]),
            "",
        ]
    for name, prof in res.get("profiles", {}).items():
        lines += [f"## Profile of {name} under workload 2 (py-spy)", ""]
        lines += [*profile_lines(prof, name), ""]
    if res.get("errors"):
        lines += ["## Errors during the run", "", *[f"- {e}" for e in res["errors"]], ""]
    lines += [
        "## Plots",
        "",
        "![added latency](plots/latency_w1.png)",
        "",
        "![throughput](plots/throughput_w2.png)",
        "",
        "![streaming](plots/streaming_w3.png)",
        "",
        "![balance](plots/balance_w4.png)",
        "",
        "![recovery](plots/recovery_w6.png)",
        "",
    ]
    return "\n".join(lines)


# --- profiles --------------------------------------------------------------------------------


def summarize_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[_short(frames[-1])] += n
        for f in {_short(x) for x in frames}:
            incl[f] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "by_file": []}
    root = max(incl.values())
    by_file: Counter[str] = Counter()
    for f, n in own.items():
        by_file[f.partition(" (")[2].rstrip(")") or f] += n
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in own.most_common(top)],
        # frames on (nearly) every stack (the entry point, the event loop) say nothing
        "inclusive": [(f, n / total) for f, n in incl.most_common() if n < root * 0.97][:top],
        "by_file": [(f, n / total) for f, n in by_file.most_common(15)],
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)": one row per function
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _lineno = where.rpartition(":")
    if not path:
        path = where
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def profile_lines(p: dict[str, Any], name: str = "corral") -> list[str]:
    lines = [
        f"{p['samples']:,} samples; req/s while sampled: {_f(p.get('rps_while_sampled'), 0)}; "
        f"flame graph: `plots/profile-w2-{name}.svg` (raw stacks under bench/out/)",
        "",
    ]
    lines += _table(
        ["self time (leaf frame)", "share"],
        [[f"`{f}`", f"{s * 100:.1f} %"] for f, s in p["self"][:20]],
    )
    lines += [""]
    lines += _table(
        ["self time by file", "share"],
        [[f"`{f}`", f"{s * 100:.1f} %"] for f, s in p.get("by_file", [])],
    )
    lines += [""]
    lines += _table(
        ["inclusive (on the stack, below the event loop)", "share"],
        [[f"`{f}`", f"{s * 100:.1f} %"] for f, s in p["inclusive"][:25]],
    )
    return lines
