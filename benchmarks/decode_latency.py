"""Batch-B decode latency (ms per output token) of an llmc engine, beside Hugging Face transformers on
the same model shape in the same process, as a fraction of the memory-bandwidth floor.

    python benchmarks/decode_latency.py ENGINE [--batch 1] [--prompt-len 128] [--steps 128] [--hf]

Floor per step = (weight bytes + KV bytes read) / bandwidth; bandwidth is measured here by a device copy.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.config import KV_CACHE_DTYPES  # noqa: E402
from llmc.plugins import ops, triton_compat  # noqa: E402
from llmc.runtime.engine import LLMEngine  # noqa: E402
from llmc.runtime.model_runner import kv_bytes_per_block  # noqa: E402
from llmc.runtime.sampling_params import SamplingParams  # noqa: E402


def measure_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    del a, b
    return nbytes / dt


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def llmc_decode(engine: LLMEngine, batch: int, prompt_len: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    prompts = [torch.randint(10, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for p in prompts:  # warm-up request (Triton JIT, allocator)
        engine.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for p in prompts:
        engine.add_request(prompt_token_ids=p, params=params)
    stamps = []  # when each step that returned new tokens came back (pipelined steps return one step late)
    while engine.has_unfinished_requests():
        outs = engine.step()
        if any(c.token_ids for o in outs for c in o.outputs):
            stamps.append(time.perf_counter())
    torch.cuda.synchronize()
    # Time per output token after the first (TPOT): the prefill and its first token are not decode steps.
    dt = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return {"ms_per_step": dt * 1e3, "steps": len(stamps) - 1}


def hf_decode(c, batch: int, prompt_len: int, steps: int) -> dict:
    """HF transformers' LlamaForCausalLM (eager, bf16, random init) of the same shape as ModelConfig ``c``."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                   num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                   head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                                   rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(10, c.vocab_size, (batch, prompt_len), device="cuda")

    def run(new: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    t_short, t_long = run(2), run(steps + 2)
    out = {"ms_per_step": (t_long - t_short) / steps * 1e3, "version": transformers.__version__}
    del model
    torch.cuda.empty_cache()
    return out


def profile_steps(engine: LLMEngine, batch: int, prompt_len: int, steps: int = 20) -> list[dict]:
    """Top CUDA kernels (by total device time) over ``steps`` decode steps. Prompts are distinct (identical
    ones would share prefix-cached blocks, so a batch's K/V would be read from L2), and profiling starts once
    every request has its first token (the token budget chunks a large batch's prefill over several steps)."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(1)
    for _ in range(batch):
        engine.add_request(prompt_token_ids=torch.randint(10, engine.vocab_size, (prompt_len,), generator=g).tolist(),
                           params=SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    started: set[str] = set()
    while len(started) < batch and engine.has_unfinished_requests():
        started.update(o.request_id for o in engine.step() if any(c.token_ids for c in o.outputs))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    rows = []
    kernels = [e for e in prof.key_averages() if "CUDA" in str(getattr(e, "device_type", ""))]  # not the ops
    rows.append({"name": "ALL DEVICE WORK (sum of kernels and copies)", "calls": sum(e.count for e in kernels),
                 "device_ms_per_step": sum(e.device_time_total for e in kernels) / 1e3 / steps})
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]:
        rows.append({"name": e.key[:80], "calls": e.count, "device_ms_per_step": e.device_time_total / 1e3 / steps})
    return rows


def override_tactics(specs: list[str]) -> dict[str, dict]:
    """``MODULE.KEY=INT`` overrides, or ``MODULE.per_shape.NxK.KEY=INT`` for one weight shape (merged into what
    the engine's tuner stored for it; a GEMV shape's keys not given keep the width's defaults), applied now and
    again after the engine loads its tuned tactics: the in-engine A/B of a tile the tuner timed alone."""
    from llmc.build import tuning

    table: dict[str, dict] = {}
    shapes: dict[str, dict[str, dict[str, int]]] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        parts = name.split(".")
        if (parts[0] not in tuning.TUNABLE_MODULES or not value.lstrip("-").isdigit()
                or not (len(parts) == 2 or (len(parts) == 4 and parts[1] == "per_shape"))):
            raise SystemExit(f"--tactic {spec!r}: expected MODULE.KEY=INT or MODULE.per_shape.NxK.KEY=INT with "
                             f"MODULE one of {tuning.TUNABLE_MODULES}")
        if len(parts) == 2:
            table.setdefault(parts[0], {})[parts[1]] = int(value)
        else:
            shapes.setdefault(parts[0], {}).setdefault(parts[2], {})[parts[3]] = int(value)
    if not table and not shapes:
        return table
    real = tuning.apply_tactics

    def overrides() -> dict[str, dict]:
        """``table`` plus each module's per-shape entries merged over the ones in place now."""
        out = {module: dict(t) for module, t in table.items()}
        for module, per in shapes.items():
            merged = {shape: dict(keys) for shape, keys in tuning._module(module).TACTICS["per_shape"].items()}
            for shape, keys in per.items():
                merged[shape] = {**({"stages": -1} if module == "gemv" else {}), **merged.get(shape, {}), **keys}
            out.setdefault(module, {})["per_shape"] = merged
        return out

    real(overrides())  # checks the keys exist

    def apply_then_override(tactics):
        real(tactics)
        real(overrides())
    tuning.apply_tactics = apply_then_override
    return overrides()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--hf", action="store_true", help="also measure Hugging Face transformers (eager, bf16)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-async-scheduling", action="store_true", help="synchronous steps (no pipelining)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    ap.add_argument("--profile", action="store_true", help="add the top CUDA kernels of 20 decode steps")
    ap.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                    help="override the engine's KV cache format")
    ap.add_argument("--no-fuse", action="append", default=[], choices=sorted(ops.FUSIONS),
                    help="run this fusion's ops unfused (repeatable): before/after figures in one process")
    ap.add_argument("--fuse", action="append", default=[], choices=sorted(ops.FUSIONS),
                    help="turn on a fusion that is off by default (repeatable), e.g. norm_gemv")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch every kernel serially (no programmatic dependent launch): the before figure")
    ap.add_argument("--tactic", action="append", default=[], metavar="MODULE.KEY=INT",
                    help="override one kernel tactic over the engine's tuned ones (repeatable), e.g. "
                         "gemv.max_m=0 runs decode rows on the MMA GEMMs: before/after in one call; "
                         "MODULE.per_shape.NxK.KEY=INT for one weight shape, e.g. gemv.per_shape.4096x11008.block_n=4")
    a = ap.parse_args()
    for name in a.no_fuse:
        ops.FUSIONS[name] = False
    for name in a.fuse:
        ops.FUSIONS[name] = True
    overrides = override_tactics(a.tactic)
    triton_compat.PDL["enabled"] = not a.no_pdl
    bw = measure_bandwidth()
    t0 = time.perf_counter()
    eng = LLMEngine(a.engine, device="cuda", gpu_memory_utilization=a.gpu_memory_utilization,
                    max_batch_size=max(a.batch, 1), show_progress=False,
                    async_scheduling=False if a.no_async_scheduling else None, kv_cache_dtype=a.kv_cache_dtype)
    if a.no_cuda_graphs:
        eng.runner.graphs = None
    startup = time.perf_counter() - t0
    wbytes = weight_bytes(eng.runner.model)
    c = eng.engine.model
    ctx = a.prompt_len + a.steps / 2
    kv_bytes = a.batch * ctx * kv_bytes_per_block(c, 1, eng.runner.kv_dtype, eng.runner.kv_quantized)
    floor_ms = (wbytes + kv_bytes) / bw * 1e3
    res = {"engine": a.engine, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "batch": a.batch, "prompt_len": a.prompt_len, "steps": a.steps, "bandwidth_GBps": bw / 1e9,
           "weight_GB": wbytes / 1e9, "floor_ms": floor_ms, "startup_s": startup,
           "graph_capture_s": eng.runner.graph_capture_seconds, "quant": eng.engine.quant.method,
           "cuda_graphs": eng.runner.graphs is not None, "async_scheduling": eng.async_scheduling,
           "kv_cache_dtype": str(eng.runner.kv_dtype), "fusions": dict(ops.FUSIONS), "pdl": triton_compat.PDL["enabled"],
           "tactic_overrides": overrides}
    ours = llmc_decode(eng, a.batch, a.prompt_len, a.steps)
    res["llmc"] = {**ours, "fraction_of_floor": floor_ms / ours["ms_per_step"],
                   "tokens_per_s": a.batch * 1e3 / ours["ms_per_step"]}
    if a.profile:
        res["profile"] = profile_steps(eng, a.batch, a.prompt_len)
    if a.hf:
        del eng
        torch.cuda.empty_cache()
        hf = hf_decode(c, a.batch, a.prompt_len, a.steps)
        res["hf_transformers"] = {**hf, "fraction_of_floor": floor_ms / hf["ms_per_step"]}
        res["speedup_vs_hf"] = hf["ms_per_step"] / ours["ms_per_step"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
