"""``llmc bench {throughput,latency,serve}``: JSON on stdout (or ``--output``), a table on stderr.

Registered by ``llmc.cli`` with ``main.add_command(bench)``. Heavy imports (torch, aiohttp,
matplotlib) happen inside the commands so ``llmc --help`` stays instant.
"""
from __future__ import annotations

import json
import math
import sys

import click

from llmc.clitools import user_errors
from llmc.config import KV_CACHE_DTYPES, SCHEDULER_POLICIES
from llmc.errors import ConfigError


_user_errors = user_errors


def _apply(fn, opts):
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def report_options(fn):
    return _apply(fn, [
        click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
                     help="Write the JSON here instead of stdout."),
        click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw a PNG here."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds prompts, lengths, arrivals."),
        click.option("--detail", is_flag=True, help="Include one record per request in the JSON."),
    ])


def workload_options(fn):
    return _apply(fn, [
        click.option("--num-requests", "-n", type=int, default=None,
                     help="Default: 100, or every line of --dataset."),
        click.option("--input-len", type=int, default=128, show_default=True, help="Prompt tokens per request."),
        click.option("--output-len", type=int, default=128, show_default=True,
                     help="Generated tokens per request (also the dataset's default)."),
        click.option("--input-len-range", type=(int, int), default=None, metavar="MIN MAX",
                     help="Sample prompt lengths uniformly in [MIN, MAX] instead."),
        click.option("--output-len-range", type=(int, int), default=None, metavar="MIN MAX",
                     help="Sample output lengths uniformly in [MIN, MAX] instead."),
        click.option("--dataset", type=click.Path(exists=True, dir_okay=False), default=None,
                     help='JSONL of {"prompt": text or token ids, "output_len": N}.'),
    ])


def engine_options(fn):
    return _apply(fn, [
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available."),
        click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
                     help="Compute dtype (default: the engine's on GPU, float32 on CPU)."),
        click.option("--max-batch-size", type=int, default=None, help="Cap below the engine's build limit."),
        click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True),
        click.option("--num-kv-blocks", type=int, default=None, help="Fix the KV cache size (blocks)."),
        click.option("--prefix-caching/--no-prefix-caching", default=True, show_default=True),
        click.option("--async-scheduling/--no-async-scheduling", default=None,
                     help="Pipeline steps: schedule step N+1 while the GPU runs step N (default: on for one GPU)."),
        click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)), default=None,
                     help="Override the engine's KV cache format (default: as built)."),
        click.option("--scheduler-policy", type=click.Choice(list(SCHEDULER_POLICIES)), default="max_utilization",
                     show_default=True, help="guaranteed_no_evict admits a request only when its whole length "
                                             "fits, so nothing is preempted (TensorRT-LLM's default)."),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="Sampling temperature (outputs always run to their length: ignore_eos)."),
    ])


def _engine_opts(device, dtype, max_batch_size, gpu_memory_utilization, num_kv_blocks, prefix_caching,
                 async_scheduling, kv_cache_dtype, scheduler_policy):
    from llmc.benchmark.offline import EngineOptions

    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    return EngineOptions(device, dtype, max_batch_size, gpu_memory_utilization, num_kv_blocks, prefix_caching,
                         async_scheduling, kv_cache_dtype, scheduler_policy)


def _workload(num_requests, input_len, output_len, input_len_range, output_len_range, dataset, vocab_size, seed):
    from llmc.benchmark.workload import load_dataset, random_requests

    if dataset:
        return load_dataset(dataset, num_requests, output_len, seed)
    return random_requests(num_requests or 100, input_len, output_len, vocab_size, seed,
                           input_len_range, output_len_range)


def _finish(out: dict, detail: bool, output: str | None, title: str, rows: list, latency: dict) -> None:
    from llmc.benchmark.report import emit, env_info, format_table

    if not detail:
        out.pop("requests", None)
    out["env"] = env_info()
    emit(out, output, format_table(title, rows, latency))


@click.group("bench", context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Measure throughput and latency (JSON on stdout, a table on stderr).

    \b
    llmc bench throughput ENGINE -n 1000 --input-len 512 --output-len 128
    llmc bench latency ENGINE --batch-size 8 --input-len 128 --output-len 128
    llmc bench serve --base-url http://localhost:8000 --request-rate 10 -n 500
    """


@bench.command()
@click.argument("engine", type=click.Path())
@workload_options
@engine_options
@click.option("--warmup", type=int, default=4, show_default=True, help="Short warm-up requests, not timed.")
@report_options
@_user_errors
def throughput(engine, num_requests, input_len, output_len, input_len_range, output_len_range, dataset, device,
               dtype, max_batch_size, gpu_memory_utilization, num_kv_blocks, prefix_caching, async_scheduling,
               kv_cache_dtype, scheduler_policy, temperature, warmup, output, plot, seed, detail):
    """Offline throughput: every request submitted at once (ignore_eos), tokens/s to the last one."""
    from llmc.benchmark import offline

    opts = _engine_opts(device, dtype, max_batch_size, gpu_memory_utilization, num_kv_blocks, prefix_caching,
                        async_scheduling, kv_cache_dtype, scheduler_policy)
    eng, startup = offline.load(engine, opts)
    reqs = _workload(num_requests, input_len, output_len, input_len_range, output_len_range, dataset,
                     eng.vocab_size, seed)
    out = offline.throughput(engine, reqs, opts, warmup=warmup, temperature=temperature, seed=seed,
                             detail=True, engine=eng)
    out["engine"]["startup_s"] = startup
    out["config"] = {"engine": engine, "num_requests": len(reqs), "input_len": None if dataset else input_len,
                     "output_len": output_len, "input_len_range": input_len_range,
                     "output_len_range": output_len_range, "dataset": dataset, "temperature": temperature,
                     "seed": seed, "warmup": warmup, "prefix_caching": prefix_caching,
                     "async_scheduling": eng.async_scheduling}
    r, e = out["results"], out["engine"]
    if plot:
        from llmc.benchmark.report import plot_requests

        recs = out["requests"]
        plot_requests(plot, [x["ttft_ms"] or 0 for x in recs], [x["e2e_ms"] or 0 for x in recs],
                      f"llmc throughput: {len(recs)} requests, {r['output_tokens_per_s']:.0f} output tok/s")
    rows = [("requests", r["num_requests"]), ("elapsed (s)", r["elapsed_s"]), ("requests/s", r["requests_per_s"]),
            ("input tokens", r["input_tokens"]), ("output tokens", r["output_tokens"]),
            ("output tokens/s", r["output_tokens_per_s"]), ("total tokens/s", r["total_tokens_per_s"]),
            ("engine", ...), ("device", f"{e['device']} {e['dtype']}"), ("startup (s)", e["startup_s"]),
            ("graph capture (s)", e["graph_capture_s"]), ("KV cache tokens", e["kv_cache_tokens"]),
            ("peak KV usage", e["peak_kv_cache_usage"]), ("peak running", e["peak_running"]),
            ("preemptions", e["num_preemptions"]), ("prefix hit rate", e["prefix_cache_hit_rate"]),
            ("steps", e["steps"])]
    _finish(out, detail, output, "llmc bench throughput", rows,
            {"TTFT (from submit)": r["ttft_ms"], "TPOT": r["tpot_ms"], "E2E": r["e2e_ms"]})


@bench.command()
@click.argument("engine", type=click.Path())
@click.option("--batch-size", "-b", type=int, default=1, show_default=True)
@click.option("--input-len", type=int, default=128, show_default=True)
@click.option("--output-len", type=int, default=128, show_default=True)
@click.option("--iters", type=int, default=3, show_default=True, help="Timed repetitions.")
@click.option("--warmup-iters", type=int, default=1, show_default=True)
@engine_options
@report_options
@_user_errors
def latency(engine, batch_size, input_len, output_len, iters, warmup_iters, device, dtype, max_batch_size,
            gpu_memory_utilization, num_kv_blocks, prefix_caching, async_scheduling, kv_cache_dtype, scheduler_policy,
            temperature, output, plot, seed, detail):
    """Latency of one batch: TTFT and time per output token at --batch-size, repeated --iters times."""
    from llmc.benchmark import offline

    opts = _engine_opts(device, dtype, max_batch_size, gpu_memory_utilization, num_kv_blocks, prefix_caching,
                        async_scheduling, kv_cache_dtype, scheduler_policy)
    out = offline.latency(engine, batch_size, input_len, output_len, iters, warmup_iters, opts,
                          temperature=temperature, seed=seed, detail=True)
    out["config"] = {"engine": engine, "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
                     "iters": iters, "warmup_iters": warmup_iters, "temperature": temperature, "seed": seed}
    r, e = out["results"], out["engine"]
    if plot:
        from llmc.benchmark.report import plot_cdfs

        recs = out["requests"]
        plot_cdfs(plot, {"TTFT": [x["ttft_ms"] for x in recs if x["ttft_ms"] is not None],
                         "TPOT": [x["tpot_ms"] for x in recs if x["tpot_ms"] is not None]},
                  f"llmc latency: batch {batch_size}, {input_len} in / {output_len} out")
    rows = [("batch size", batch_size), ("input / output len", f"{input_len} / {output_len}"), ("iters", iters),
            ("output tokens/s", r["output_tokens_per_s"]),
            ("engine", ...), ("device", f"{e['device']} {e['dtype']}"), ("startup (s)", e["startup_s"]),
            ("graph capture (s)", e["graph_capture_s"])]
    _finish(out, detail, output, "llmc bench latency", rows,
            {"TTFT": r["ttft_ms"], "TPOT": r["tpot_ms"], "ITL": r["itl_ms"], "E2E": r["e2e_ms"],
             "batch E2E": r["batch_e2e_ms"]})


@bench.command()
@click.option("--base-url", required=True, help="Server root, e.g. http://localhost:8000 (a trailing /v1 is fine).")
@click.option("--model", default=None, help="Model name to request (default: the first of /v1/models).")
@click.option("--endpoint", default="/v1/completions", show_default=True)
@workload_options
@click.option("--vocab-size", type=int, default=32000, show_default=True,
              help="Random prompts draw token ids below this; set it to the served model's vocabulary.")
@click.option("--request-rate", type=float, default=math.inf, show_default=True,
              help="Poisson arrivals per second; inf sends everything at once.")
@click.option("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Ask for exact output lengths (a vLLM-style extension most servers accept).")
@click.option("--slo-ttft-ms", type=float, default=None, help="Goodput SLO on time to first token.")
@click.option("--slo-tpot-ms", type=float, default=None, help="Goodput SLO on time per output token.")
@click.option("--slo-e2e-ms", type=float, default=None, help="Goodput SLO on end-to-end latency.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Requests sent (one at a time) before timing.")
@click.option("--timeout", "request_timeout", type=float, default=600.0, show_default=True,
              help="Per-request limit in seconds.")
@click.option("--api-key", default=None, help="Sent as a Bearer token.")
@click.option("--extra-body", default=None, help="JSON object merged into every request body.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: if a terminal).")
@report_options
@_user_errors
def serve(base_url, model, endpoint, num_requests, input_len, output_len, input_len_range, output_len_range, dataset,
          vocab_size, request_rate, max_concurrency, temperature, ignore_eos, slo_ttft_ms, slo_tpot_ms, slo_e2e_ms,
          warmup, request_timeout, api_key, extra_body, progress, output, plot, seed, detail):
    """Load an OpenAI-compatible server (ours or a peer) with streaming /v1/completions requests."""
    from llmc.benchmark import serving

    try:
        extra = json.loads(extra_body) if extra_body else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--extra-body is not valid JSON ({e})") from None
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError("--extra-body must be a JSON object")
    reqs = _workload(num_requests, input_len, output_len, input_len_range, output_len_range, dataset, vocab_size,
                     seed)
    out = serving.run(base_url, reqs, model=model, request_rate=request_rate, max_concurrency=max_concurrency,
                      seed=seed, temperature=temperature, ignore_eos=ignore_eos, endpoint=endpoint,
                      api_key=api_key, warmup=warmup, request_timeout=request_timeout, slo_ttft_ms=slo_ttft_ms,
                      slo_tpot_ms=slo_tpot_ms, slo_e2e_ms=slo_e2e_ms, extra_body=extra,
                      progress=sys.stderr.isatty() if progress is None else progress)
    raw = out.pop("_raw")
    if detail:
        out["requests"] = [{"ok": x.ok, "input_tokens": x.input_tokens, "output_tokens": x.output_tokens,
                            "ttft_ms": None if x.ttft is None else x.ttft * 1e3,
                            "tpot_ms": None if x.tpot is None else x.tpot * 1e3, "e2el_ms": x.latency * 1e3,
                            "error": x.error} for x in raw]
    out["config"]["dataset"] = dataset
    r = out["results"]
    if plot:
        from llmc.benchmark.report import plot_cdfs

        ok = [x for x in raw if x.ok]
        plot_cdfs(plot, {"TTFT": [x.ttft * 1e3 for x in ok], "TPOT": [x.tpot * 1e3 for x in ok if x.tpot],
                         "ITL": [i * 1e3 for x in ok for i in x.itls], "E2E": [x.latency * 1e3 for x in ok]},
                  f"{out['config']['model']} @ {out['config']['base_url']}, rate {out['config']['request_rate']}"
                  + (f", concurrency {max_concurrency}" if max_concurrency else ""))
    rows = [("model", out["config"]["model"]), ("completed", r["completed"]), ("failed", r["failed"]),
            ("duration (s)", r["duration_s"]), ("request throughput (req/s)", r["request_throughput"]),
            ("output throughput (tok/s)", r["output_throughput"]),
            ("total throughput (tok/s)", r["total_token_throughput"]),
            ("input / output tokens", f"{r['total_input_tokens']} / {r['total_output_tokens']}"),
            ("peak concurrent requests", r["max_concurrent_requests"])]
    if "goodput" in r:
        rows += [("goodput (req/s)", r["goodput"]), ("SLO attainment", r["slo_attainment"])]
    if r["errors"]:
        rows += [("errors", ...), *[(msg[:60], n) for msg, n in r["errors"].items()]]
    _finish(out, detail, output, "llmc bench serve", rows,
            {"TTFT": r["ttft_ms"], "TPOT": r["tpot_ms"], "ITL": r["itl_ms"], "E2EL": r["e2el_ms"]})
