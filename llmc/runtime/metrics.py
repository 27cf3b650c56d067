"""Engine metrics in plain Python (no server dependency): counters, gauges and fixed-bucket histograms.

The server exports these in Prometheus format; ``llmc bench`` reads them directly.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1


class EngineMetrics:
    """Everything the issue lists: queue length, running, KV usage, prefix-cache hit rate, TTFT, ITL,
    end-to-end latency, prompt and generated token counts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram()
        self.inter_token = Histogram()
        self.e2e = Histogram()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.computed_tokens = 0  # tokens run through the model (prefix-cache hits are not)
        self.requests_finished: dict[str, int] = {}
        self.num_preemptions = 0
        self.num_waiting = 0
        self.num_running = 0
        self.kv_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "num_waiting": self.num_waiting, "num_running": self.num_running, "kv_cache_usage": self.kv_usage,
                "prefix_cache_queries": self.prefix_queries, "prefix_cache_hits": self.prefix_hits,
                "prefix_cache_hit_rate": self.prefix_hit_rate, "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens, "computed_tokens": self.computed_tokens, "num_preemptions": self.num_preemptions,
                "requests_finished": dict(self.requests_finished),
                "ttft_mean": self.ttft.sum / self.ttft.count if self.ttft.count else None,
                "itl_mean": self.inter_token.sum / self.inter_token.count if self.inter_token.count else None,
            }
