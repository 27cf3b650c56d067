"""TP=2 vs TP=1 on a synthetic Llama-2-7B-shaped checkpoint (needs 2 GPUs): correctness (float32 logits and
greedy tokens) and speed (batch-1 decode latency, max-load throughput in bf16). JSON on stdout.

    python benchmarks/tp_bench.py [--shape llama-2-7b] [--workdir /tmp/tp]
Each measurement runs in its own process so GPU memory is returned between them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, engine: str, out: str) -> None:
    import torch

    from llmc.runtime.engine import LLMEngine
    from llmc.runtime.model_runner import ScheduledSeq
    from llmc.runtime.sampling_params import SamplingParams
    from llmc.runtime.sequence import Sequence

    g = torch.Generator().manual_seed(0)
    res: dict = {"mode": mode, "engine": engine}
    if mode == "correctness":
        eng = LLMEngine(engine, device="cuda", dtype="float32", gpu_memory_utilization=0.6, show_progress=False,
                        cuda_graph_batch_sizes=[])
        prompts = [torch.randint(10, eng.vocab_size, (n,), generator=g).tolist() for n in (17, 100)]
        seq = Sequence("x", prompts[0], SamplingParams())
        eng.kv.allocate_slots(seq, len(prompts[0]))
        res["logits"] = eng.runner.forward([ScheduledSeq(seq, len(prompts[0]), True)])[0].cpu().tolist()
        eng.kv.free(seq)
        reqs = [eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=32,
                                                                          ignore_eos=True)) for p in prompts]
        while eng.has_unfinished_requests():
            eng.step()
        res["tokens"] = [r.final_output().outputs[0].token_ids for r in reqs]
    elif mode == "latency":
        eng = LLMEngine(engine, device="cuda", gpu_memory_utilization=0.8, show_progress=False)
        p = torch.randint(10, eng.vocab_size, (128,), generator=g).tolist()
        for n in (4, 64):
            eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            eng.step()
            torch.cuda.synchronize()
            t, steps = time.perf_counter(), 0
            while eng.has_unfinished_requests():
                eng.step()
                steps += 1
            torch.cuda.synchronize()
            res["ms_per_step"] = (time.perf_counter() - t) / steps * 1e3
        res["cuda_graphs"] = getattr(eng.runner, "graphs", None) is not None
    eng.shutdown()
    Path(out).write_text(json.dumps(res))


def run_child(mode: str, engine: Path, out: Path) -> dict:
    subprocess.run([sys.executable, __file__, "--child", mode, str(engine), str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--workdir", default="/tmp/tp")
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    w = Path(a.workdir)
    w.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    subprocess.run([py, str(ROOT / "benchmarks/synthetic_ckpt.py"), a.shape, str(w / "ckpt")], check=True,
                   capture_output=True)
    engines = {}
    for tp in (1, 2):
        engines[tp] = w / f"engine-tp{tp}"
        subprocess.run([py, "-m", "llmc.cli", "build", str(w / "ckpt"), "-o", str(engines[tp]), "--device", "cuda",
                        "--max-seq-len", "2048", "--max-batch-size", "64", "--tp-size", str(tp)], check=True,
                       capture_output=True, cwd=ROOT)
    res: dict = {"shape": a.shape, "weights": "synthetic (random)"}
    c = {tp: run_child("correctness", engines[tp], w / f"c{tp}.json") for tp in (1, 2)}
    import math

    diff = max(abs(x - y) for x, y in zip(c[1]["logits"], c[2]["logits"]))
    scale = max(abs(x) for x in c[1]["logits"])
    res["float32_max_abs_logit_diff"] = diff
    res["float32_max_abs_logit"] = scale
    res["greedy_tokens_equal"] = c[1]["tokens"] == c[2]["tokens"]
    res["greedy_tokens_matching_prefix"] = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
                                           for p, q in zip(c[1]["tokens"], c[2]["tokens"])]
    for tp in (1, 2):
        res[f"tp{tp}_latency"] = run_child("latency", engines[tp], w / f"l{tp}.json")
        out = w / f"t{tp}.json"
        subprocess.run([py, "-m", "llmc.cli", "bench", "throughput", str(engines[tp]), "-n", "256", "--input-len",
                        "128", "--output-len", "128", "--device", "cuda", "-o", str(out)], check=True, cwd=ROOT,
                       capture_output=True)
        t = json.loads(out.read_text())["results"]
        res[f"tp{tp}_throughput_128_128"] = {"output_tokens_per_s": t["output_tokens_per_s"],
                                             "requests": t["num_requests"]}
    assert not math.isnan(diff)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
