"""Tensor parallelism, TP=N vs TP=1, on a synthetic checkpoint (Llama-2-7B shape by default; needs N GPUs).

Reports correctness (float32, eager: max |logit difference| over every prompt position, greedy tokens equal;
bf16: TP=N greedy tokens with CUDA graphs vs eager) and speed (batch-1 decode ms/step with and without CUDA
graphs, max-load throughput through ``llmc bench throughput``). JSON on stdout; progress on stderr.

    python benchmarks/tp_bench.py [--shape llama-2-7b] [--tp 2] [--workdir /tmp/tp]
    python benchmarks/tp_bench.py --shape tiny --device cpu --num-requests 16   # smoke test without GPUs

Every measurement runs in a child process with a timeout, so GPU memory is returned between them and one
failure (or hang) is recorded in the JSON instead of losing the rest; the report so far is rewritten to
WORKDIR/tp_bench.json after each phase, and a failed child's last stderr lines (with its progress marks, to
locate a hang) go to stderr at once. TP "graphs" runs set LLMC_TP_CUDA_GRAPHS=1 (CUDA graphs around the NCCL
collectives are opt-in). The weights are random: say so when quoting the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[tp_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- child side
def _engine(path: str, device: str, dtype: str | None, graphs: bool):
    from llmc.runtime.engine import LLMEngine

    kw = {} if graphs else {"cuda_graph_batch_sizes": []}
    t = time.perf_counter()
    eng = LLMEngine(path, device=device, dtype=dtype, gpu_memory_utilization=0.8, show_progress=False, **kw)
    log(f"engine ready in {time.perf_counter() - t:.1f} s (cuda graphs: "
        f"{getattr(eng.runner, 'graphs', None) is not None})")
    return eng


def _prompts(vocab: int, lens: list[int]) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens]


def _greedy(eng, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from llmc.runtime.sampling_params import SamplingParams

    reqs = [eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                      ignore_eos=True)) for p in prompts]
    while eng.has_unfinished_requests():
        eng.step()
    return [r.final_output().outputs[0].token_ids for r in reqs]


def child(mode: str, engine: str, device: str, out: str) -> None:
    import torch

    from llmc.runtime.model_runner import ScheduledSeq
    from llmc.runtime.sampling_params import SamplingParams
    from llmc.runtime.sequence import Sequence

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res: dict = {"mode": mode, "engine": engine}
    if mode == "logits":  # float32, eager: the reference comparison
        eng = _engine(engine, device, "float32", graphs=False)
        ids = _prompts(eng.vocab_size, [100])[0]
        seq = Sequence("x", ids, SamplingParams())
        assert eng.kv.allocate_slots(seq, len(ids))
        logits = eng.runner.forward([ScheduledSeq(seq, len(ids), True)], logit_rows=list(range(len(ids))))
        eng.kv.free(seq)
        torch.save(logits.cpu(), out + ".pt")
        res["tokens"] = _greedy(eng, _prompts(eng.vocab_size, [17, 100, 300]), 32)
    elif mode in ("greedy-graphs", "greedy-eager"):  # compute dtype of the engine (bf16)
        eng = _engine(engine, device, None, graphs=mode == "greedy-graphs")
        res["cuda_graphs"] = getattr(eng.runner, "graphs", None) is not None
        res["tokens"] = _greedy(eng, _prompts(eng.vocab_size, [17, 100, 300]), 32)
    elif mode in ("latency-graphs", "latency-eager"):  # batch-1 decode, 128-token prompt
        eng = _engine(engine, device, None, graphs=mode == "latency-graphs")
        res["cuda_graphs"] = getattr(eng.runner, "graphs", None) is not None
        res["graph_capture_s"] = getattr(eng.runner, "graph_capture_seconds", 0.0)
        p = _prompts(eng.vocab_size, [128])[0]
        times = []
        for n in (8, 129):  # the first request warms up; the second's decode steps are timed
            eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            eng.step()  # prefill
            times = []
            while eng.has_unfinished_requests():
                sync()
                t = time.perf_counter()
                eng.step()
                sync()
                times.append(time.perf_counter() - t)
        times.sort()
        res["decode_steps"] = len(times)
        res["ms_per_step_median"] = times[len(times) // 2] * 1e3
        res["ms_per_step_mean"] = sum(times) / len(times) * 1e3
    else:
        raise SystemExit(f"unknown mode {mode}")
    log("measured; shutting down")
    t = time.perf_counter()
    eng.shutdown()
    res["shutdown_s"] = time.perf_counter() - t
    log(f"shut down in {res['shutdown_s']:.1f} s")
    Path(out).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------- parent side
def run(cmd: list[str], timeout: float, what: str, env: dict | None = None) -> tuple[bool, str]:
    """Run ``cmd``; (ok, tail of its stderr) and never raise, so one failure does not lose the report."""
    log(f"{what}: {' '.join(cmd)}")
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log(f"{what}: TIMEOUT after {timeout:.0f} s; stderr tail:\n{err[-3000:]}")
        return False, f"timed out after {timeout:.0f} s; stderr tail: {err[-1500:]}"
    log(f"{what}: rc={p.returncode} in {time.perf_counter() - t:.1f} s")
    if p.returncode:
        log(f"{what}: stderr tail:\n{(p.stderr or '')[-3000:]}")
    return p.returncode == 0, (p.stderr or "")[-1500:]


def run_child(mode: str, engine: Path, device: str, out: Path, timeout: float) -> dict:
    out.unlink(missing_ok=True)
    env = {"LLMC_TP_CUDA_GRAPHS": "1"} if mode.endswith("graphs") else None
    ok, err = run([sys.executable, __file__, "--child", mode, str(engine), device, str(out)], timeout, mode, env)
    if not ok or not out.exists():
        return {"error": err}
    return json.loads(out.read_text())


def save(res: dict, w: Path) -> None:
    (w / "tp_bench.json").write_text(json.dumps(res, indent=1))


def finish(res: dict, w: Path) -> None:
    save(res, w)
    print(json.dumps(res, indent=1))


def first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--workdir", default="/tmp/tp")
    ap.add_argument("--num-requests", type=int, default=256, help="throughput workload (128 in, 128 out)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "ENGINE", "DEVICE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)

    w = Path(a.workdir)
    w.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    res: dict = {"shape": a.shape, "weights": "synthetic (random)", "tp": a.tp, "device": a.device,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    try:
        import torch

        res["torch"] = torch.__version__
        if a.device == "cuda":
            res["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.device_count() < a.tp:
                res["error"] = f"needs {a.tp} GPUs, found {torch.cuda.device_count()}"
                finish(res, w)
                return
    except Exception as e:  # noqa: BLE001
        res["torch_error"] = repr(e)

    ckpt = w / f"ckpt-{a.shape}"
    if not (ckpt / "config.json").exists():
        ok, err = run([py, str(ROOT / "benchmarks/synthetic_ckpt.py"), a.shape, str(ckpt), "--device", a.device],
                      a.timeout, "synthetic checkpoint")
        if not ok:
            res["error"] = f"synthetic checkpoint: {err}"
            finish(res, w)
            return
    engines: dict[int, Path] = {}
    for tp in (1, a.tp):
        e = w / f"engine-{a.shape}-tp{tp}"
        ok, err = run([py, "-m", "llmc.cli", "build", str(ckpt), "-o", str(e), "--device", a.device,
                       "--max-seq-len", "2048", "--max-batch-size", str(a.max_batch_size),
                       "--max-num-tokens", "2048", "--tp-size", str(tp)], a.timeout, f"build tp={tp}")
        if ok:
            engines[tp] = e
        else:
            res[f"build_tp{tp}_error"] = err
    if len(engines) < 2:
        finish(res, w)
        return

    # correctness: float32 eager
    lg = {tp: run_child("logits", engines[tp], a.device, w / f"logits{tp}.json", a.timeout) for tp in (1, a.tp)}
    corr: dict = {}
    if all("error" not in lg[tp] for tp in lg):
        import torch

        l1, ln = torch.load(str(w / "logits1.json.pt")), torch.load(str(w / f"logits{a.tp}.json.pt"))
        corr["float32_max_abs_logit_diff"] = (l1 - ln).abs().max().item()
        corr["float32_max_abs_logit"] = l1.abs().max().item()
        corr["float32_argmax_equal_rows"] = f"{(l1.argmax(-1) == ln.argmax(-1)).sum().item()}/{l1.shape[0]}"
        t1, tn = lg[1]["tokens"], lg[a.tp]["tokens"]
        corr["float32_greedy_tokens_equal"] = t1 == tn
        corr["float32_greedy_matching_prefix"] = [first_diff(x, y) for x, y in zip(t1, tn)]
    else:
        corr["float32_error"] = {tp: lg[tp].get("error") for tp in lg}
    res["correctness"] = corr
    save(res, w)
    # bf16 (the engine's compute dtype): TP=N eager vs TP=1, and TP=N with CUDA graphs vs TP=N eager (the same
    # arithmetic replayed: must be equal). Eager first, so a hang with graphs costs only its own timeout.
    g = {"tp1": run_child("greedy-graphs", engines[1], a.device, w / "greedy1.json", a.timeout)}
    for m in ("greedy-eager", "greedy-graphs"):
        g[m] = run_child(m, engines[a.tp], a.device, w / f"{m}.json", a.timeout)
    ok = {k: "error" not in v for k, v in g.items()}
    if ok["tp1"] and ok["greedy-eager"]:
        corr["bf16_tp_eager_vs_tp1_matching_prefix"] = [first_diff(x, y) for x, y in
                                                        zip(g["greedy-eager"]["tokens"], g["tp1"]["tokens"])]
    if ok["greedy-eager"] and ok["greedy-graphs"]:
        corr["bf16_tp_graphs_used"] = g["greedy-graphs"]["cuda_graphs"]
        corr["bf16_tp_graphs_vs_eager_tokens_equal"] = g["greedy-graphs"]["tokens"] == g["greedy-eager"]["tokens"]
    for k, v in g.items():
        if "error" in v:
            corr[f"bf16_{k}_error"] = v["error"]
    res["correctness"] = corr
    save(res, w)

    lat = {}
    for tp, mode in ((1, "latency-graphs"), (a.tp, "latency-eager"), (a.tp, "latency-graphs")):
        lat[f"tp{tp}_{mode.split('-')[1]}"] = run_child(mode, engines[tp], a.device, w / f"lat-{tp}-{mode}.json",
                                                        a.timeout)
        save(res | {"batch1_decode": lat}, w)
    res["batch1_decode"] = lat

    if not a.skip_throughput:
        thr = {}
        for tp in (1, a.tp):
            out = w / f"throughput{tp}.json"
            out.unlink(missing_ok=True)
            ok, err = run([py, "-m", "llmc.cli", "bench", "throughput", str(engines[tp]), "-n", str(a.num_requests),
                           "--input-len", "128", "--output-len", "128", "--device", a.device, "-o", str(out)],
                          a.timeout, f"throughput tp={tp}")
            if ok and out.exists():
                d = json.loads(out.read_text())
                r, e = d["results"], d["engine"]
                thr[f"tp{tp}"] = {"output_tokens_per_s": r["output_tokens_per_s"], "requests": r["num_requests"],
                                  "elapsed_s": r["elapsed_s"], "kv_cache_tokens": e.get("kv_cache_tokens"),
                                  "peak_running": e.get("peak_running"), "preemptions": e.get("num_preemptions"),
                                  "graph_capture_s": e.get("graph_capture_s")}
            else:
                thr[f"tp{tp}"] = {"error": err}
        if all("error" not in v for v in thr.values()):
            thr["speedup"] = thr[f"tp{a.tp}"]["output_tokens_per_s"] / thr["tp1"]["output_tokens_per_s"]
        res["throughput_128_128"] = thr
    finish(res, w)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # leave NVLink multicast off on shared hosts
    main()
