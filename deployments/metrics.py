"""The service's Prometheus metrics (through Ray's metrics), with the names fixed in DESIGN.md.

Built per replica by ``Metrics()``; nothing is created at import time.
"""

from __future__ import annotations

from ray.serve import metrics

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60]


class Metrics:
    def __init__(self):
        self.requests = metrics.Counter(
            "disagg_requests_total", description="finished requests",
            tag_keys=("path", "status"))
        self.ttft = metrics.Histogram(
            "disagg_time_to_first_token_seconds", description="time to first token",
            boundaries=_LATENCY_BUCKETS)
        self.tpot = metrics.Histogram(
            "disagg_time_per_output_token_seconds", description="time per output token after "
            "the first", boundaries=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1])
        self.ttft_stage = metrics.Histogram(
            "disagg_ttft_stage_seconds", description="TTFT breakdown by stage",
            boundaries=_LATENCY_BUCKETS, tag_keys=("stage",))
        self.kv_transfer_bytes = metrics.Counter(
            "disagg_kv_transfer_bytes_total", description="KV bytes moved",
            tag_keys=("backend",))
        self.kv_transfer_seconds = metrics.Histogram(
            "disagg_kv_transfer_seconds", description="KV transfer time",
            boundaries=_LATENCY_BUCKETS, tag_keys=("backend",))
        self.kv_blocks_free = metrics.Gauge(
            "disagg_kv_blocks_free", description="free KV blocks of a decode replica")
        self.kv_leases_active = metrics.Gauge(
            "disagg_kv_leases_active", description="published KV caches not yet pulled")
        self.prefill_queue_tokens = metrics.Gauge(
            "disagg_prefill_queue_tokens", description="prompt tokens waiting for or in prefill")
        self.prefill_fallbacks = metrics.Counter(
            "disagg_prefill_fallbacks_total",
            description="disaggregated requests prefilled by decode: no prefill replica could "
                        "take them")
