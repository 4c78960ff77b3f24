"""The simulator's engine gauges in the Prometheus text format, under vLLM's metric names."""

from __future__ import annotations

import orjson

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def prometheus(
    model: str,
    *,
    running: int,
    waiting: int,
    kv_cache_usage: float,
    prefix_queries: int,
    prefix_hits: int,
    requests: int,
) -> bytes:
    """`GET /metrics`: the gauges and counters a router reads from vLLM, for one model."""
    label = b"{model_name=" + orjson.dumps(model) + b"}"  # JSON string escaping suits here
    rows = (
        (
            "vllm:num_requests_running",
            b"gauge",
            "Number of requests in model execution batches.",
            running,
        ),
        (
            "vllm:num_requests_waiting",
            b"gauge",
            "Number of requests waiting to be processed.",
            waiting,
        ),
        (
            "vllm:kv_cache_usage_perc",
            b"gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_cache_usage,
        ),
        (
            "vllm:gpu_cache_usage_perc",
            b"gauge",
            "GPU KV-cache usage (deprecated name).",
            kv_cache_usage,
        ),
        (
            "vllm:prefix_cache_queries_total",
            b"counter",
            "Prefix cache queries, in tokens.",
            prefix_queries,
        ),
        ("vllm:prefix_cache_hits_total", b"counter", "Prefix cache hits, in tokens.", prefix_hits),
        (
            "vllm:request_success_total",
            b"counter",
            "Count of successfully answered requests.",
            requests,
        ),
    )
    out: list[bytes] = []
    for name, kind, doc, value in rows:
        key = name.encode()
        out.append(b"# HELP %b %b\n# TYPE %b %b\n" % (key, doc.encode(), key, kind))
        out.append(b"%b%b %r\n" % (key, label, float(value)))
    return b"".join(out)
