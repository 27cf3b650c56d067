"""Prometheus exposition of the engine's metrics (names follow vLLM's ``vllm:*`` with an ``llmc:`` prefix).

``engine_state`` copies every number in one go and must run on the engine thread (``run_sync``): the
scheduler and block manager are not thread-safe, and a scrape must not see half a step.
"""
from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from llmc.runtime.metrics import Histogram


def engine_state(engine) -> dict:
    m, kv = engine.metrics, engine.kv
    with m.lock:
        hists = {k: copy.deepcopy(getattr(m, k)) for k in ("ttft", "inter_token", "e2e")}
    state = {"snapshot": m.snapshot(), "hists": hists,
             "running": engine.scheduler.num_running, "waiting": engine.scheduler.num_waiting,
             "kv_usage": kv.usage, "kv_used": kv.num_used_blocks, "kv_free": kv.num_free_blocks,
             "prefix_queries": kv.stats.prefix_queries, "prefix_hits": kv.stats.prefix_hits, "spec": None}
    if engine.spec is not None:
        state["spec"] = (engine.spec.stats.proposed, engine.spec.stats.accepted)
    return state


def _hist(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets, acc = [], 0
    for bound, count in zip(list(h.buckets) + [float("inf")], h.counts):
        acc += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
    fam = HistogramMetricFamily(name, doc)
    fam.add_metric([], buckets, h.sum)
    return fam


class _StateCollector:
    def __init__(self, state: dict):
        self.state = state

    def collect(self):
        s = self.state
        snap = s["snapshot"]
        yield GaugeMetricFamily("llmc:num_requests_running", "Sequences in the running batch", value=s["running"])
        yield GaugeMetricFamily("llmc:num_requests_waiting", "Sequences waiting to be scheduled", value=s["waiting"])
        yield GaugeMetricFamily("llmc:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)",
                                value=s["kv_usage"])
        yield GaugeMetricFamily("llmc:kv_cache_blocks_used", "KV cache blocks in use", value=s["kv_used"])
        yield GaugeMetricFamily("llmc:kv_cache_blocks_free", "KV cache blocks free or evictable", value=s["kv_free"])
        yield CounterMetricFamily("llmc:prompt_tokens", "Prompt tokens received", value=snap["prompt_tokens"])
        yield CounterMetricFamily("llmc:generation_tokens", "Tokens generated", value=snap["generation_tokens"])
        yield CounterMetricFamily("llmc:prefix_cache_queries", "Tokens looked up in the prefix cache",
                                  value=s["prefix_queries"])
        yield CounterMetricFamily("llmc:prefix_cache_hits", "Tokens found in the prefix cache",
                                  value=s["prefix_hits"])
        yield CounterMetricFamily("llmc:num_preemptions", "Sequences preempted", value=snap["num_preemptions"])
        fin = CounterMetricFamily("llmc:request_success", "Finished requests by reason", labels=["finished_reason"])
        for reason, count in sorted(snap["requests_finished"].items()):
            fin.add_metric([reason], count)
        yield fin
        if s["spec"] is not None:
            yield CounterMetricFamily("llmc:spec_decode_num_draft_tokens", "Proposed tokens", value=s["spec"][0])
            yield CounterMetricFamily("llmc:spec_decode_num_accepted_tokens", "Accepted tokens", value=s["spec"][1])
        h = s["hists"]
        yield _hist("llmc:time_to_first_token_seconds", "Time to first token", h["ttft"])
        yield _hist("llmc:inter_token_latency_seconds", "Time between output tokens", h["inter_token"])
        yield _hist("llmc:e2e_request_latency_seconds", "End-to-end request latency", h["e2e"])


def metrics_text(state: dict) -> bytes:
    """Prometheus text for a state taken by ``engine_state``."""
    reg = CollectorRegistry()
    reg.register(_StateCollector(state))
    return generate_latest(reg)
