"""``llmc bench``: offline modes on the tiny engine (exact token counts), the serving client against a fake
OpenAI streaming server with known delays and failures, and the percentile helper against numpy."""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.benchmark.command import bench
from llmc.benchmark.report import percentiles, summarize
from llmc.benchmark.workload import arrival_offsets, load_dataset, random_requests

try:  # the serve client and --plot need the `bench` extra; the offline modes do not
    from aiohttp import web
except ImportError:
    web = None
try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False

needs_aiohttp = pytest.mark.skipif(web is None, reason="needs aiohttp (pip install 'llmc[bench]')")


def plot_args(path):
    return ["--plot", path] if HAS_MPL else []


def assert_plot(path):
    assert not HAS_MPL or path.stat().st_size > 1000


def run_bench(*args):
    res = CliRunner().invoke(bench, [str(a) for a in args], catch_exceptions=False)
    return res


def read_json(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ percentiles
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentiles_match_numpy(n):
    xs = np.random.default_rng(n).exponential(3.0, size=n)
    ps = [0, 1, 25, 50, 90, 99, 99.9, 100]
    got = percentiles(xs.tolist(), ps)
    want = np.percentile(xs, ps)
    for p, w in zip(ps, want):
        assert got[f"p{p:g}"] == pytest.approx(w, rel=1e-12, abs=1e-12)


def test_percentiles_empty_and_summary():
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    s = summarize([0.001, 0.002, 0.003], scale=1e3)
    assert s["mean"] == pytest.approx(2.0) and s["p50"] == pytest.approx(2.0) and s["count"] == 3
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(3.0)
    assert summarize([])["mean"] is None
    with pytest.raises(ValueError):
        percentiles([1.0], [101])


# ------------------------------------------------------------------------------------------- workload
def test_workload_is_deterministic():
    a = random_requests(20, 8, 4, 300, seed=3, input_len_range=(2, 9), output_len_range=(1, 5))
    b = random_requests(20, 8, 4, 300, seed=3, input_len_range=(2, 9), output_len_range=(1, 5))
    c = random_requests(20, 8, 4, 300, seed=4, input_len_range=(2, 9), output_len_range=(1, 5))
    assert [(r.prompt_token_ids, r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len) for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    assert all(2 <= r.input_len <= 9 and 1 <= r.output_len <= 5 for r in a)
    assert all(10 <= t < 300 for r in a for t in r.prompt_token_ids)
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    offs = arrival_offsets(4000, 50.0, seed=1)
    assert offs == arrival_offsets(4000, 50.0, seed=1) and offs == sorted(offs) and offs[0] == 0.0
    assert np.mean(np.diff(offs)) == pytest.approx(1 / 50.0, rel=0.1)


def test_dataset_cycles_and_validates(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hello", "output_len": 3}\n\n{"prompt": [11, 12, 13]}\n')
    reqs = load_dataset(f, 5, default_output_len=7)
    assert [r.output_len for r in reqs] == [3, 7, 3, 7, 3]
    assert reqs[1].prompt_token_ids == [11, 12, 13] and reqs[0].prompt == "hello"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    res = run_bench("serve", "--base-url", "http://127.0.0.1:1", "--dataset", bad)
    assert res.exit_code != 0 and "error:" in res.output and "'prompt'" in res.output


# ------------------------------------------------------------------------------------------- offline modes
def test_throughput_exact_counts(tiny_factory, tmp_path):
    _, eng = tiny_factory("llama-gqa")
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    res = run_bench("throughput", eng, "-n", 6, "--input-len", 12, "--output-len", 5, "--device", "cpu",
                    "--warmup", 1, "-o", out, *plot_args(png), "--detail")
    assert res.exit_code == 0, res.output
    doc = read_json(out)
    r, e = doc["results"], doc["engine"]
    assert r["num_requests"] == 6 and r["output_tokens"] == 30 and r["input_tokens"] == 72
    assert e["engine_generation_tokens"] == 30  # the engine's own count agrees
    assert r["elapsed_s"] > 0
    assert r["output_tokens_per_s"] == pytest.approx(30 / r["elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx(102 / r["elapsed_s"])
    assert r["requests_per_s"] == pytest.approx(6 / r["elapsed_s"])
    assert r["ttft_ms"]["count"] == 6 and r["e2e_ms"]["count"] == 6
    assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"] <= r["elapsed_s"] * 1e3
    assert 0 < e["peak_kv_cache_usage"] <= 1 and e["num_preemptions"] >= 0 and e["startup_s"] > 0
    assert e["device"] == "cpu" and e["graph_capture_s"] == 0
    assert len(doc["requests"]) == 6 and all(q["output_tokens"] == 5 for q in doc["requests"])
    assert doc["env"]["llmc"]
    assert_plot(png)
    assert "output tokens/s" in res.output  # the table (stderr)


def test_throughput_sampled_lengths_dataset_and_preemption(tiny_factory, tmp_path):
    _, eng = tiny_factory("llama-gqa")
    out = tmp_path / "r.json"
    res = run_bench("throughput", eng, "-n", 8, "--input-len-range", 4, 20, "--output-len-range", 2, 6,
                    "--seed", 5, "--device", "cpu", "--warmup", 0, "-o", out)
    assert res.exit_code == 0, res.output
    want = random_requests(8, 0, 0, 384, seed=5, input_len_range=(4, 20), output_len_range=(2, 6))
    r = read_json(out)["results"]
    assert r["output_tokens"] == sum(q.output_len for q in want)
    assert r["input_tokens"] == sum(q.input_len for q in want)

    ds = tmp_path / "d.jsonl"
    ds.write_text("".join(json.dumps({"prompt": list(range(20, 20 + 40 + i)), "output_len": 8 + i}) + "\n"
                          for i in range(4)))
    # 16 blocks x 16 tokens = 256 tokens of KV for 10 x ~50 tokens: the engine must queue or preempt, and
    # every request must still produce exactly its output_len; the prompts share 2 full blocks
    res = run_bench("throughput", eng, "--dataset", ds, "-n", 10, "--output-len", 99, "--device", "cpu",
                    "--warmup", 0, "--num-kv-blocks", 16, "-o", out)
    assert res.exit_code == 0, res.output
    doc = read_json(out)
    assert doc["results"]["num_requests"] == 10
    assert doc["results"]["output_tokens"] == sum(8 + (i % 4) for i in range(10))
    assert doc["results"]["input_tokens"] == sum(40 + (i % 4) for i in range(10))
    e = doc["engine"]
    assert e["kv_cache_tokens"] == 256 and e["peak_kv_cache_usage"] > 0.5
    assert e["prefix_cache_hit_rate"] > 0 and isinstance(e["num_preemptions"], int)


def test_throughput_guaranteed_no_evict_preempts_nothing(tiny_factory, tmp_path):
    """The same tight pool (256 KV tokens for 10 requests of ~60): admitting only whole requests that fit
    preempts nothing and still produces every token; the policy is reported."""
    _, eng = tiny_factory("llama-gqa")
    out = tmp_path / "ne.json"
    res = run_bench("throughput", eng, "-n", 10, "--input-len", 40, "--output-len", 20, "--device", "cpu",
                    "--warmup", 0, "--num-kv-blocks", 16, "--no-prefix-caching",
                    "--scheduler-policy", "guaranteed_no_evict", "-o", out)
    assert res.exit_code == 0, res.output
    doc = read_json(out)
    assert doc["results"]["output_tokens"] == 200 and doc["engine"]["num_preemptions"] == 0
    assert doc["engine"]["scheduler_policy"] == "guaranteed_no_evict" and doc["engine"]["peak_running"] >= 2
    res = run_bench("throughput", eng, "-n", 10, "--input-len", 40, "--output-len", 20, "--device", "cpu",
                    "--warmup", 0, "--num-kv-blocks", 16, "--no-prefix-caching", "-o", out)
    assert res.exit_code == 0 and read_json(out)["engine"]["num_preemptions"] > 0  # the pool is tight enough


def run_script(script: str, *args) -> dict:
    """Run a benchmarks/ script from the repository root; its JSON output."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, f"benchmarks/{script}", *map(str, args)], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_host_overhead_benchmark_runs(tiny_factory):
    """benchmarks/host_overhead.py (model forward removed) runs on the CPU and reports every batch size."""
    _, eng = tiny_factory("llama-gqa")
    rows = run_script("host_overhead.py", eng, "--batch", "4,16", "--steps", 3, "--prompt-len", 20)["rows"]
    assert [x["batch"] for x in rows] == [4, 16] and [x["running"] for x in rows] == [4, 16]
    assert all(x["host_ms_per_step"] > 0 for x in rows)


def test_detokenize_benchmark_runs(smol_engine):
    """benchmarks/detokenize.py reports a per-token time for a real tokenizer, through the fast path."""
    doc = run_script("detokenize.py", smol_engine / "tokenizer", "--streams", 2, "--tokens", 20)
    assert doc["tokens"] == 40 and doc["us_per_token"] > 0 and doc["fast_path"] is True


def test_throughput_rejects_oversized_requests(tiny_factory):
    _, eng = tiny_factory("llama-gqa")
    res = run_bench("throughput", eng, "-n", 2, "--input-len", 250, "--output-len", 50, "--device", "cpu")
    assert res.exit_code != 0 and "max_seq_len" in res.output and "Traceback" not in res.output


def test_latency_mode(tiny_factory, tmp_path):
    _, eng = tiny_factory("llama-gqa")
    out, png = tmp_path / "l.json", tmp_path / "l.png"
    res = run_bench("latency", eng, "-b", 3, "--input-len", 8, "--output-len", 4, "--iters", 2,
                    "--warmup-iters", 1, "--device", "cpu", "-o", out, *plot_args(png))
    assert res.exit_code == 0, res.output
    r = read_json(out)["results"]
    assert r["output_tokens"] == 3 * 4 * 2
    assert r["ttft_ms"]["count"] == 6 and r["tpot_ms"]["count"] == 6 and r["batch_e2e_ms"]["count"] == 2
    assert r["itl_ms"]["count"] == 6 * 3  # one token per decode step on the CPU
    for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = r[k]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert r["e2e_ms"]["max"] <= r["batch_e2e_ms"]["max"] + 1e-6
    assert_plot(png)
    res = run_bench("latency", eng, "-b", 99, "--device", "cpu")
    assert res.exit_code != 0 and "max batch size" in res.output


# ------------------------------------------------------------------------------------------- serving client
class FakeOpenAI:
    """A tiny OpenAI-style streaming server with known delays. ``mode='flaky'`` cycles through an HTTP 500,
    an error event mid-stream, a success, and a dropped connection; ``mode='bare'`` sends no usage and ends
    with an empty finish chunk (tokens must then be counted from the chunks)."""

    def __init__(self, ttft: float = 0.2, itl: float = 0.03, mode: str = "ok", models: bool = True):
        self.ttft, self.itl, self.mode, self.models = ttft, itl, mode, models
        self.count = 0
        self.active = 0
        self.peak_active = 0
        self.payloads: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        assert self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _models(self, request):
        if not self.models:
            return web.json_response({"error": {"message": "not here"}}, status=404)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    @staticmethod
    def _chunk(text, finish=None):
        return ("data: " + json.dumps({"id": "c", "object": "text_completion", "model": "fake-model",
                                       "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
                + "\n\n").encode()

    async def _completions(self, request):
        body = await request.json()
        self.payloads.append(body)
        kind = {"flaky": self.count % 4, "bare": 4}.get(self.mode, 2)
        self.count += 1
        if kind == 0:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(self.ttft)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    await asyncio.sleep(self.itl)
                await resp.write(self._chunk(f" t{i}", "length" if i == n - 1 and kind != 4 else None))
                if kind == 1:
                    await resp.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
                    break
                if kind == 3:
                    request.transport.close()  # connection dropped mid-stream
                    return resp
            if kind == 4:  # OpenAI's own shape: a trailing empty chunk carries finish_reason, no usage
                await resp.write(self._chunk("", "length"))
            if kind == 2:
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": 0}
                await resp.write(("data: " + json.dumps({"id": "c", "choices": [], "usage": usage}) + "\n\n").encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.active -= 1


@needs_aiohttp
def test_serve_measures_known_delays(tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    fake = FakeOpenAI(ttft=0.2, itl=0.03)
    with fake as url:
        res = run_bench("serve", "--base-url", url, "-n", 8, "--input-len", 6, "--output-len", 6,
                        "--vocab-size", 100, "--warmup", 1, "-o", out, *plot_args(png), "--slo-ttft-ms", 1000,
                        "--slo-tpot-ms", 500, "--detail")
    assert res.exit_code == 0, res.output
    doc = read_json(out)
    r = doc["results"]
    assert r["completed"] == 8 and r["failed"] == 0 and r["errors"] == {}
    assert r["total_output_tokens"] == 48 and r["total_input_tokens"] == 48 and r["incomplete_outputs"] == 0
    assert 0.19 < r["ttft_ms"]["p50"] / 1e3 < 0.35 and 0.19 < r["ttft_ms"]["p99"] / 1e3 < 0.45
    assert r["tpot_ms"]["mean"] / 1e3 == pytest.approx(0.03, abs=0.015)
    assert r["itl_ms"]["count"] == 8 * 5 and r["itl_ms"]["p50"] / 1e3 == pytest.approx(0.03, abs=0.015)
    e2e = 0.2 + 5 * 0.03
    assert e2e * 0.95 < r["e2el_ms"]["p50"] / 1e3 < e2e + 0.2
    assert r["duration_s"] < 2 and r["request_throughput"] == pytest.approx(8 / r["duration_s"])
    assert r["output_throughput"] == pytest.approx(48 / r["duration_s"])
    assert r["good_requests"] == 8 and r["goodput"] == pytest.approx(r["request_throughput"])
    assert r["max_concurrent_requests"] == 8  # request rate inf: all at once
    assert doc["config"]["model"] == "fake-model"
    assert_plot(png)
    assert len(fake.payloads) == 9  # warm-up + 8
    p = fake.payloads[-1]
    assert p["model"] == "fake-model" and p["stream"] and p["ignore_eos"] and p["max_tokens"] == 6
    assert all(10 <= t < 100 for t in p["prompt"])


@needs_aiohttp
def test_serve_counts_chunks_without_usage(tmp_path):
    out = tmp_path / "b.json"
    with FakeOpenAI(ttft=0.02, itl=0.01, mode="bare") as url:
        res = run_bench("serve", "--base-url", url, "-n", 3, "--input-len", 4, "--output-len", 5, "--warmup", 0,
                        "--vocab-size", 50, "-o", out)
    assert res.exit_code == 0, res.output
    r = read_json(out)["results"]
    assert r["completed"] == 3 and r["total_output_tokens"] == 15 and r["itl_ms"]["count"] == 3 * 4
    assert r["total_input_tokens"] == 12  # known from the token-id prompts


@needs_aiohttp
def test_serve_rate_concurrency_and_slo(tmp_path):
    out = tmp_path / "s.json"
    fake = FakeOpenAI(ttft=0.05, itl=0.01)
    with fake as url:
        res = run_bench("serve", "--base-url", url, "--model", "m", "-n", 6, "--input-len", 4, "--output-len", 3,
                        "--max-concurrency", 2, "--request-rate", 50, "--warmup", 0, "--slo-ttft-ms", 1,
                        "-o", out)
    assert res.exit_code == 0, res.output
    r = read_json(out)["results"]
    assert r["completed"] == 6 and fake.peak_active <= 2 and r["max_concurrent_requests"] <= 2
    assert r["good_requests"] == 0 and r["goodput"] == 0 and r["slo_attainment"] == 0  # 50 ms TTFT > 1 ms SLO
    assert {p["model"] for p in fake.payloads} == {"m"}


@needs_aiohttp
def test_serve_counts_failures_without_crashing(tmp_path):
    out = tmp_path / "f.json"
    with FakeOpenAI(ttft=0.01, itl=0.005, mode="flaky") as url:
        res = run_bench("serve", "--base-url", url, "-n", 8, "--input-len", 4, "--output-len", 4, "--warmup", 0,
                        "--vocab-size", 50, "-o", out, *plot_args(tmp_path / "f.png"))
    assert res.exit_code == 0, res.output
    r = read_json(out)["results"]
    assert r["completed"] == 2 and r["failed"] == 6
    errs = r["errors"]
    assert errs.get("HTTP 500: boom") == 2 and errs.get("stream error: engine died") == 2
    assert sum(errs.values()) == 6  # the two dropped connections, whatever aiohttp calls them
    assert r["total_output_tokens"] == 8 and r["ttft_ms"]["count"] == 2
    assert "boom" in res.output  # the table lists the errors


@needs_aiohttp
def test_serve_unreachable_endpoint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "u.json"
    res = run_bench("serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "x", "-n", 3, "--warmup", 1,
                    "--vocab-size", 50, "--input-len", 4, "--output-len", 2, "-o", out)
    assert res.exit_code == 0, res.output
    doc = read_json(out)
    assert doc["results"]["failed"] == 3 and doc["results"]["completed"] == 0
    assert doc["results"]["ttft_ms"]["p50"] is None and doc["config"]["warmup_failed"] == 1
    # without --model the /v1/models lookup is needed: one clear error line, no traceback
    res = run_bench("serve", "--base-url", f"http://127.0.0.1:{port}", "-n", 1)
    assert res.exit_code != 0 and "pass --model" in res.output and "Traceback" not in res.output
    with FakeOpenAI(models=False) as url:
        res = run_bench("serve", "--base-url", url, "-n", 1)
    assert res.exit_code != 0 and "HTTP 404: not here" in res.output


def test_bench_help_is_cheap():
    t = time.perf_counter()
    res = run_bench("--help")
    assert res.exit_code == 0 and "throughput" in res.output and "serve" in res.output
    assert time.perf_counter() - t < 5
