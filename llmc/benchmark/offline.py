"""In-process benchmarks on ``LLMEngine``: throughput (everything submitted at once) and latency
(a fixed batch, repeated).

Both drive ``engine.step()`` directly rather than ``LLM.generate`` so every token delta gets a
timestamp as the caller would see it (after the step returns, device synchronized by the sampler's
``.tolist()``): TTFT/TPOT here mean the same as in the serving client, minus HTTP.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmc.benchmark.report import summarize
from llmc.benchmark.workload import BenchRequest, random_requests
from llmc.errors import ConfigError

# A step that schedules nothing while requests are pending means the engine cannot make progress
# (e.g. a prompt larger than the whole KV cache); stop after this many instead of spinning forever.
MAX_IDLE_STEPS = 1000


@dataclass
class EngineOptions:
    """What the bench commands pass through to ``LLMEngine``."""

    device: str | None = None
    dtype: str | None = None
    max_batch_size: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    async_scheduling: bool | None = None  # None: the engine's default (on for one GPU)
    kv_cache_dtype: str | None = None  # None: the engine's
    scheduler_policy: str = "max_utilization"

    def kwargs(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "max_batch_size": self.max_batch_size,
                "gpu_memory_utilization": self.gpu_memory_utilization, "num_kv_blocks": self.num_kv_blocks,
                "enable_prefix_caching": self.enable_prefix_caching, "show_progress": False,
                "async_scheduling": self.async_scheduling, "kv_cache_dtype": self.kv_cache_dtype,
                "scheduler_policy": self.scheduler_policy}


@dataclass
class Trace:
    """Caller-side timeline of one request (perf_counter seconds)."""

    submit: float
    input_len: int
    chunk_times: list[float] = field(default_factory=list)  # when each non-empty delta arrived
    output_tokens: int = 0
    finish: float | None = None
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.submit if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.finish - self.submit if self.finish is not None else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (undefined for a single token)."""
        if self.output_tokens < 2 or self.finish is None:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def load(engine_dir: str, opts: EngineOptions):
    """Build the ``LLMEngine`` and time it: startup (weights, KV cache, CUDA graphs) is a figure too."""
    from llmc.runtime.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(engine_dir, **opts.kwargs())
    return engine, time.perf_counter() - t0


def _tokenize(engine, reqs: list[BenchRequest]) -> list[list[int]]:
    """Text prompts are tokenized before the clock starts: the figure is the engine's, not the tokenizer's."""
    return [r.prompt_token_ids if r.prompt_token_ids is not None else engine.encode(r.prompt) for r in reqs]


def run_requests(engine, ids: list[list[int]], output_lens: list[int], tag: str, temperature: float = 1.0,
                 ignore_eos: bool = True, on_step=None) -> tuple[list[Trace], float]:
    """Submit all at once, step until done; returns per-request traces (submission order) and elapsed."""
    from llmc.runtime.sampling_params import SamplingParams

    traces: dict[str, Trace] = {}
    idle = 0
    t0 = time.perf_counter()
    try:
        for i, (p, n) in enumerate(zip(ids, output_lens)):
            rid = f"bench-{tag}-{i}"
            engine.add_request(params=SamplingParams(max_tokens=n, temperature=temperature, ignore_eos=ignore_eos),
                               prompt_token_ids=p, request_id=rid)
            traces[rid] = Trace(time.perf_counter(), len(p))
        computed = engine.metrics.computed_tokens
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            if on_step is not None:
                on_step(engine)
            progressed = outs or engine.metrics.computed_tokens != computed  # a prefill chunk counts
            computed = engine.metrics.computed_tokens
            idle = 0 if progressed else idle + 1
            if idle > MAX_IDLE_STEPS:
                raise ConfigError(f"the engine made no progress for {MAX_IDLE_STEPS} steps with requests pending "
                                  "(a prompt larger than the KV cache?); lower --input-len or give it more memory")
            for o in outs:
                tr = traces.get(o.request_id)
                if tr is None:
                    continue
                n = sum(len(c.token_ids) for c in o.outputs)
                if n:
                    tr.chunk_times.append(now)
                    tr.output_tokens += n
                if o.finished:
                    tr.finish = now
                    tr.finish_reason = next((c.finish_reason for c in o.outputs if c.finish_reason), None)
    except BaseException:
        for rid in traces:  # leave the engine clean on a bad request or Ctrl-C
            engine.abort_request(rid)
        raise
    return list(traces.values()), time.perf_counter() - t0


def _warmup(engine, num: int, seed: int) -> None:
    """A few short requests first: kernel JIT, allocator growth and first-touch costs stay out of the figure."""
    if num <= 0:
        return
    reqs = random_requests(num, 16, 4, engine.vocab_size, seed=seed + 10_007)
    run_requests(engine, [r.prompt_token_ids for r in reqs], [r.output_len for r in reqs], "warmup")


def _counters(engine) -> dict:
    m = engine.metrics
    return {"preemptions": m.num_preemptions, "prefix_queries": m.prefix_queries, "prefix_hits": m.prefix_hits,
            "generation_tokens": m.generation_tokens, "computed_tokens": m.computed_tokens}


def engine_info(engine, startup_s: float) -> dict:
    r = engine.runner
    return {"device": str(r.device), "dtype": str(r.dtype).replace("torch.", ""),
            "max_batch_size": engine.max_batch_size, "max_num_tokens": engine.max_num_tokens,
            "max_seq_len": engine.max_seq_len, "num_kv_blocks": r.num_kv_blocks, "block_size": r.block_size,
            "async_scheduling": engine.async_scheduling, "scheduler_policy": engine.scheduler.policy,
            "kv_cache_dtype": str(r.kv_dtype).replace("torch.", ""),
            "kv_cache_tokens": r.num_kv_blocks * r.block_size, "startup_s": startup_s,
            "graph_capture_s": getattr(r, "graph_capture_seconds", 0.0),
            "model": {"type": engine.engine.model.model_type, "layers": engine.engine.model.num_hidden_layers,
                      "hidden_size": engine.engine.model.hidden_size, "vocab_size": engine.vocab_size},
            "quantization": engine.engine.quant.method}


def _latency_stats(traces: list[Trace]) -> dict:
    return {"ttft_ms": summarize([t.ttft for t in traces if t.ttft is not None], 1e3),
            "tpot_ms": summarize([t.tpot for t in traces if t.tpot is not None], 1e3),
            "itl_ms": summarize([x for t in traces for x in t.itls], 1e3),
            "e2e_ms": summarize([t.e2e for t in traces if t.e2e is not None], 1e3)}


def throughput(engine_dir: str, reqs: list[BenchRequest], opts: EngineOptions, warmup: int = 4,
               temperature: float = 1.0, seed: int = 0, detail: bool = False, engine=None) -> dict:
    """Everything submitted at once with ignore_eos, so the engine is saturated and the token counts are
    exactly what was asked: the number that says how many GPUs a workload needs."""
    startup = 0.0
    if engine is None:
        engine, startup = load(engine_dir, opts)
    ids = _tokenize(engine, reqs)
    _warmup(engine, min(warmup, engine.max_batch_size), seed)
    before = _counters(engine)
    peak = {"kv": 0.0, "running": 0, "steps": 0}

    def on_step(e):
        peak["kv"] = max(peak["kv"], e.metrics.kv_usage)
        peak["running"] = max(peak["running"], e.metrics.num_running)
        peak["steps"] += 1

    traces, elapsed = run_requests(engine, ids, [r.output_len for r in reqs], "tput", temperature, True, on_step)
    after = _counters(engine)
    d = {k: after[k] - before[k] for k in after}
    n_in = sum(t.input_len for t in traces)
    n_out = sum(t.output_tokens for t in traces)
    results = {
        "num_requests": len(traces), "elapsed_s": elapsed, "requests_per_s": len(traces) / elapsed,
        "input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out,
        "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
        **_latency_stats(traces),
    }
    stats = {
        "num_preemptions": d["preemptions"],
        "prefix_cache_queries": d["prefix_queries"],
        "prefix_cache_hit_rate": d["prefix_hits"] / d["prefix_queries"] if d["prefix_queries"] else 0.0,
        "peak_kv_cache_usage": peak["kv"], "peak_running": peak["running"], "steps": peak["steps"],
        "engine_generation_tokens": d["generation_tokens"], "computed_tokens": d["computed_tokens"],
    }
    out = {"mode": "throughput", "results": results, "engine": {**engine_info(engine, startup), **stats}}
    if detail:
        out["requests"] = [_trace_record(t) for t in traces]
    return out


def latency(engine_dir: str, batch_size: int, input_len: int, output_len: int, iters: int, warmup_iters: int,
            opts: EngineOptions, temperature: float = 1.0, seed: int = 0, detail: bool = False,
            engine=None) -> dict:
    """A batch of ``batch_size`` equal prompts, ``iters`` times after ``warmup_iters``: TTFT and time per
    output token of an unloaded engine at that batch size (the interactive-user figure). Fresh prompts
    each iteration so the prefix cache cannot turn later prefills into hits."""
    if iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    startup = 0.0
    if engine is None:
        engine, startup = load(engine_dir, opts)
    if batch_size > engine.max_batch_size:
        raise ConfigError(f"--batch-size {batch_size} exceeds the engine's max batch size {engine.max_batch_size}")
    all_traces: list[Trace] = []
    batch_e2e: list[float] = []
    before = None
    for it in range(warmup_iters + iters):
        reqs = random_requests(batch_size, input_len, output_len, engine.vocab_size, seed=seed + 1000 * it)
        if it == warmup_iters:
            before = _counters(engine)
        traces, elapsed = run_requests(engine, [r.prompt_token_ids for r in reqs], [output_len] * batch_size,
                                       f"lat{it}", temperature)
        if it >= warmup_iters:
            all_traces += traces
            batch_e2e.append(elapsed)
    after = _counters(engine)
    n_out = sum(t.output_tokens for t in all_traces)
    results = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len, "iters": iters,
               "output_tokens": n_out, **_latency_stats(all_traces),
               "batch_e2e_ms": summarize(batch_e2e, 1e3),
               "output_tokens_per_s": n_out / sum(batch_e2e)}
    out = {"mode": "latency", "results": results,
           "engine": {**engine_info(engine, startup), "num_preemptions": after["preemptions"] - before["preemptions"]}}
    if detail:
        out["requests"] = [_trace_record(t) for t in all_traces]
    return out


def _trace_record(t: Trace) -> dict:
    return {"input_len": t.input_len, "output_tokens": t.output_tokens, "ttft_ms": _ms(t.ttft),
            "tpot_ms": _ms(t.tpot), "e2e_ms": _ms(t.e2e), "finish_reason": t.finish_reason}


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3
