"""Prometheus exposition of the engine's metrics (names follow vLLM's ``vllm:*`` with an ``llmc:`` prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from llmc.runtime.metrics import Histogram


def _hist(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets, acc = [], 0
    for bound, count in zip(list(h.buckets) + [float("inf")], h.counts):
        acc += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
    fam = HistogramMetricFamily(name, doc)
    fam.add_metric([], buckets, h.sum)
    return fam


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        m = e.metrics
        snap = m.snapshot()
        kv = e.kv
        yield GaugeMetricFamily("llmc:num_requests_running", "Sequences in the running batch",
                                value=e.scheduler.num_running)
        yield GaugeMetricFamily("llmc:num_requests_waiting", "Sequences waiting to be scheduled",
                                value=e.scheduler.num_waiting)
        yield GaugeMetricFamily("llmc:kv_cache_usage_perc", "Fraction of KV cache blocks in use", value=kv.usage)
        yield GaugeMetricFamily("llmc:kv_cache_blocks_used", "KV cache blocks in use", value=kv.num_used_blocks)
        yield GaugeMetricFamily("llmc:kv_cache_blocks_free", "KV cache blocks free or evictable",
                                value=kv.num_free_blocks)
        yield CounterMetricFamily("llmc:prompt_tokens", "Prompt tokens received", value=snap["prompt_tokens"])
        yield CounterMetricFamily("llmc:generation_tokens", "Tokens generated", value=snap["generation_tokens"])
        yield CounterMetricFamily("llmc:prefix_cache_queries", "Tokens looked up in the prefix cache",
                                  value=kv.stats.prefix_queries)
        yield CounterMetricFamily("llmc:prefix_cache_hits", "Tokens found in the prefix cache",
                                  value=kv.stats.prefix_hits)
        yield CounterMetricFamily("llmc:num_preemptions", "Sequences preempted", value=snap["num_preemptions"])
        fin = CounterMetricFamily("llmc:request_success", "Finished requests by reason", labels=["finished_reason"])
        for reason, count in sorted(snap["requests_finished"].items()):
            fin.add_metric([reason], count)
        yield fin
        if e.spec is not None:
            yield CounterMetricFamily("llmc:spec_decode_num_draft_tokens", "Proposed tokens",
                                      value=e.spec.stats.proposed)
            yield CounterMetricFamily("llmc:spec_decode_num_accepted_tokens", "Accepted tokens",
                                      value=e.spec.stats.accepted)
        yield _hist("llmc:time_to_first_token_seconds", "Time to first token", m.ttft)
        yield _hist("llmc:inter_token_latency_seconds", "Time between output tokens", m.inter_token)
        yield _hist("llmc:e2e_request_latency_seconds", "End-to-end request latency", m.e2e)


def metrics_text(engine) -> bytes:
    reg = CollectorRegistry()
    reg.register(EngineCollector(engine))
    return generate_latest(reg)
