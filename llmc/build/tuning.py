"""Build-time tactic selection (``llmc build --device cuda``), in the spirit of TensorRT's builder.

Each Triton module keeps its tile sizes in a module-level ``TACTICS`` dict that its launches read on every
call. The tuner times a small grid of variants per kernel family on this model's shapes on this GPU,
checks every variant's output against the default tactics' output (a variant that fails to compile, runs
out of shared memory or computes something else is dropped), and keeps the fastest. The engine stores the
overrides per module plus a record of what was timed; the runner applies them when it loads the engine on
CUDA (``apply_tactics``), and ``load_engine`` already refuses an engine tuned for another compute capability.

``TACTICS`` are process-wide: two engines with different tunings in one process share the last applied.
"""
from __future__ import annotations

import copy
import importlib
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from llmc.config import BuildConfig, ModelConfig, QuantConfig
from llmc.errors import ConfigError

TUNABLE_MODULES = ("triton_kernels", "quant_gemm", "gemv")
Timer = Callable[[Callable[[], Any]], float]


@dataclass
class Family:
    """One kernel family: the TACTICS keys it owns, the candidate values, and cases to time."""

    name: str
    module: str
    keys: tuple[str, ...]
    candidates: list[tuple]
    cases: list[Callable[[], torch.Tensor]]
    scope: str | None = None  # keys live in TACTICS["per_shape"][scope] (one weight shape), not at the top
    defaults: dict[str, Any] | None = None  # a scoped key's value while the scope does not set it


def _module(name: str):
    return importlib.import_module(f"llmc.plugins.{name}")


def _table(fam: Family) -> dict[str, Any]:
    """The dict ``fam``'s keys live in: the module's TACTICS, or one shape's entry in its ``per_shape``."""
    tactics = _module(fam.module).TACTICS
    return tactics if fam.scope is None else tactics["per_shape"].setdefault(fam.scope, {})


L2_COLD_BYTES = 256 << 20  # weight bytes a GEMM case cycles through: ~5x an H100/H200 L2


def _cold(make: Callable[[], Any], nbytes: int, device: str) -> list:
    """Enough copies of a weight (``make()`` each) that a case cycling through them never hits in L2: a decode
    step streams every weight from HBM, while one 32 MB weight timed alone would sit in the 50 MB L2. One
    copy off CUDA, and at most 64 (a weight that small is cheap wherever it is read from)."""
    count = min(64, -(-L2_COLD_BYTES // max(nbytes, 1))) if str(device).startswith("cuda") else 1
    return [make() for _ in range(max(1, count))]


def _cycle(fn: Callable[[Any], torch.Tensor], weights: list) -> Callable[[], torch.Tensor]:
    """A case running ``fn`` on each weight copy in turn; it returns the last output (the same weight values)."""
    def run() -> torch.Tensor:
        for w in weights[:-1]:
            fn(w)
        return fn(weights[-1])
    return run


def _cold_tensors(t: dict[str, torch.Tensor], device: str) -> list[dict[str, torch.Tensor]]:
    """``_cold`` copies of a quantized weight's tensors (one ``clone`` of each per copy)."""
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    return _cold(lambda: {name: v.clone() for name, v in t.items()}, nbytes, device)


def cuda_graph_timer(fn: Callable[[], Any]) -> float:
    """Milliseconds per call, replayed from a CUDA graph (launch overhead excluded, as in a decode step)."""
    import triton.testing as tt

    return tt.do_bench_cudagraph(fn, rep=20)


def _attention_families(model: ModelConfig, build: BuildConfig, device: str, dtype: torch.dtype) -> list[Family]:
    from llmc.plugins import triton_kernels as tk
    from llmc.plugins.metadata import AttentionMetadata

    from llmc.plugins.kv_layout import kv_storage_dtype, v_cache_layout
    from llmc.plugins.reference import quantize_kv

    hq, hkv, d, page = model.num_attention_heads, model.num_key_value_heads, model.head_dim, build.block_size
    g = torch.Generator().manual_seed(0)
    kv_quant = kv_storage_dtype(build.kv_cache_dtype, device)  # time the cache the engine will read

    def batch(q_lens: list[int], ctx: list[int]):
        tables, used = [], 0
        for c in ctx:
            nb = -(-c // page)
            tables.append(list(range(used, used + nb)))
            used += nb
        meta = AttentionMetadata.build(q_lens, ctx, tables, page, device)
        q = torch.randn(sum(q_lens), hq, d, generator=g).to(device, dtype)
        kc = torch.randn(used, page, hkv, d, generator=g).to(device, dtype)
        vc = torch.randn(used, page, hkv, d, generator=g).to(device, dtype)
        if kv_quant is None:
            return lambda: tk.paged_attention(q, kc, vc, meta, d ** -0.5)
        (kq, ks), (vq, vs) = quantize_kv(kc, kv_quant), quantize_kv(vc, kv_quant)
        vq = v_cache_layout(vq)  # the page layout the engine's pools have
        return lambda: tk.paged_attention(q, kq, vq, meta, d ** -0.5, ks, vs)

    b = min(build.max_batch_size, 32)
    ctx = min(build.max_seq_len, 2048)
    # long contexts at a mid batch, one very long sequence (splits), and a full batch of short contexts
    # (the 128-in/128-out regime at max load, where each program walks only a few tiles)
    wide, short = min(build.max_batch_size, 256), min(build.max_seq_len, 256)
    decode_cases = [batch([1] * b, [ctx] * b), batch([1], [min(build.max_seq_len, 8192)]),
                    batch([1] * wide, [short] * wide)]
    n = max(4, min(build.max_num_tokens, 4096) // 4)
    prefill_cases = [batch([n] * 4, [n] * 4)]
    decode_keys = ("decode_block_n", "decode_num_warps", "decode_num_stages")
    # stages 1: no cp.async pipeline, K/V loaded straight into registers. With a few tiles per program
    # occupancy may matter more than pipelining (offline sm_90, fp8 64-token tiles: 128 registers a program
    # unpipelined, 146 at stages 2)
    decode_grid = list(itertools.product((32, 64, 128), (4, 8), (1, 2, 3)))
    if kv_quant is not None:
        # 1-byte K/V (own keys): 128-token tiles won every long-context case of the H200 sweeps (BENCHMARKS.md).
        # Block 32 is timed again since V pages went head_dim-major: offline sm_90 it needs 96 registers
        # (128-token tiles 155), i.e. 5 programs per SM instead of 3, which may pay where short contexts leave
        # each program one or two tiles. The CUDA-core path (decode_use_dot 0, 2x slower) is not timed.
        # Same grid as the 16-bit tiles.
        decode_keys = ("decode_q8_block_n", "decode_q8_num_warps", "decode_q8_num_stages")
    return [
        Family("attention decode", "triton_kernels", decode_keys, decode_grid, decode_cases),
        Family("attention prefill", "triton_kernels",
               ("prefill_block_m", "prefill_block_n", "prefill_num_warps", "prefill_num_stages"),
               [(m, nn, w, s) for m, nn in ((64, 64), (128, 64), (64, 128), (128, 32)) for w in (4, 8)
                for s in (2, 3)], prefill_cases),
    ]


def _projection_shapes(model: ModelConfig) -> list[tuple[int, int]]:
    """``(N, K)`` of the fused QKV, O, fused gate/up and down projections."""
    h, i = model.hidden_size, model.intermediate_size
    qkv = (model.num_attention_heads + 2 * model.num_key_value_heads) * model.head_dim
    return [(qkv, h), (h, model.num_attention_heads * model.head_dim), (2 * i, h), (h, i)]


def _gemv_families(model: ModelConfig, quant: QuantConfig, device: str, dtype: torch.dtype) -> list[Family]:
    """The decode-rows GEMV (``gemv.py``), per weight shape at one row: whether it beats the GEMM it replaces
    (cuBLAS for 16-bit weights, the decode tiling for 8-bit ones, timed after those won) and with which tiles;
    the LM head too. Then up to how many rows it is used, with those choices in place."""
    from llmc.convert.quantize import quantize_projection
    from llmc.plugins import gemv
    from llmc.plugins import quant_gemm as qg
    from llmc.plugins import triton_kernels as tk

    method = quant.method if quant.enabled else None
    g = torch.Generator().manual_seed(2)
    calls = []  # (n, k, weight bytes, fn(x)) per projection; int4 rows have their own GEMV (quant_gemm gemv_*)
    for n, k in ([] if method in ("int4", "int4-awq") else _projection_shapes(model)):
        w = torch.randn(n, k, generator=g) * 0.02
        if method is None:
            ws = _cold(lambda w=w: w.to(device, dtype), n * k * dtype.itemsize, device)
            calls.append((n, k, 2, lambda x, ws=ws: _cycle(lambda wd: tk.linear(x, wd), ws)()))
        else:
            t = {name: v.to(device) for name, v in quantize_projection(method, w, None).items()}
            copies = _cold_tensors(t, device)
            isc = torch.ones(k, device=device) if method == "w8a8" else None
            calls.append((n, k, 1, lambda x, c=copies, isc=isc: _cycle(
                lambda t: qg.qgemm(x, method, t["qweight"], t["scales"], None, 0, isc), c)()))
    vocab, hidden = model.vocab_size, model.hidden_size
    heads = _cold(lambda: (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype),
                  vocab * hidden * dtype.itemsize, device)
    head = (vocab, hidden, 2, lambda x: _cycle(lambda w: tk.linear(x, w), heads)())

    def case(k: int, fn, rows: int) -> Callable[[], torch.Tensor]:
        x = torch.randn(rows, k, generator=g).to(device, dtype)
        if method == "w8a8":  # its own switch, off by default: the shape families time the GEMV with it on
            return lambda: _with_tactics("gemv", {"w8a8_gemv": 1}, lambda: fn(x))
        return lambda: fn(x)
    fams, seen = [], set()
    fp8 = torch.float8_e4m3fn  # fp8 rows against fp8 weights take the f16 products' default tiles
    half = method == "fp8" and gemv.half_products(fp8, fp8)
    for n, k, wb, fn in calls + [head]:
        if gemv.shape_key(n, k) in seen:  # e.g. a square O projection as wide as the vocabulary: one choice
            continue
        seen.add(gemv.shape_key(n, k))
        defaults = gemv.shape_tactics(wb, n, k, half)
        off = (0, *(defaults[key] for key in gemv.PER_SHAPE_KEYS[1:]))  # the GEMM it replaces
        tiles = [(1, bn, bk, w, xv, 1) for bn, bk, w, xv in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (0, 1))
                 if bn > 4 or not xv]  # unpipelined: broadcast activations only pay with several rows per thread
        # pipelined through shared memory (each stage holds the activations once, as a vector): the H200's best
        # per projection came from these (BENCHMARKS.md, seventh session)
        tiles += [(1, bn, bk, w, 1, st) for bn, bk, w, st in itertools.product((4, 8), (512, 1024), (4, 8), (3, 4))]
        if half and wb == 1:  # the f16 products always load the activations as one vector: x_vector is moot
            tiles = list(dict.fromkeys(t[:4] + (1,) + t[5:] for t in tiles))
        fams.append(Family(f"GEMV {n}x{k} (1 row)", "gemv", gemv.PER_SHAPE_KEYS, [off] + tiles, [case(k, fn, 1)],
                           scope=gemv.shape_key(n, k), defaults=defaults))
    if calls:
        rows_keys, limits = ("max_m" if method is None else "q8_max_m",), [(0,), (1,), (2,), (4,)]
        if method == "w8a8":
            rows_keys, limits = ("q8_max_m", "w8a8_gemv"), [(1, 0), (1, 1), (2, 1), (4, 1)]
        cases = [lambda f=fn, x=torch.randn(r, k, generator=g).to(device, dtype): f(x)
                 for r in (1, 2, 4) for _, k, _, fn in calls]
        fams.append(Family("GEMV up to M rows", "gemv", rows_keys, limits, cases))
    return fams


def _with_tactics(module: str, overrides: dict[str, Any], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with ``overrides`` in ``module``'s TACTICS, restored afterwards."""
    table = _module(module).TACTICS
    saved = {k: table[k] for k in overrides}
    table.update(overrides)
    try:
        return fn()
    finally:
        table.update(saved)


def _gemm_families(model: ModelConfig, quant: QuantConfig, device: str, dtype: torch.dtype) -> list[Family]:
    from llmc.convert.quantize import quantize_projection
    from llmc.models.quant_linear import group_size_of
    from llmc.plugins import gemv
    from llmc.plugins import quant_gemm as qg

    shapes = _projection_shapes(model)
    group = group_size_of(quant) if quant.method in ("int4", "int4-awq") else 0
    g = torch.Generator().manual_seed(1)
    cases, projections = [], []
    for n, k in shapes:
        t = {name: v.to(device) for name, v in
             quantize_projection(quant.method, torch.randn(n, k, generator=g) * 0.02, group or None).items()}
        if group:
            t["scales_gn"], t["zeros_gn"] = t["scales"].t().contiguous(), t["zeros"].t().contiguous()
        copies = _cold_tensors(t, device)
        isc = torch.ones(k, device=device) if quant.method in ("int4-awq", "w8a8") else None
        projections.append((k, copies, isc))
        # one row for int4 (its GEMV); 16 for 8-bit weights, whose fewest rows take gemv.py instead
        x = torch.randn(1 if group else 16, k, generator=g).to(device, dtype)
        cases.append(_cycle(lambda t, x=x, isc=isc: qg.qgemm(x, quant.method, t["qweight"], t["scales"], t.get("zeros"),
                                                            group, isc, None, t.get("scales_gn"), t.get("zeros_gn")),
                            copies))
    if group:  # its GEMV's tiles per weight shape (qg.TACTICS["per_shape"]), as TensorRT picks per layer
        # narrow, long tiles won in the engine (16 x 4096); 3 stages never did there
        tiles = list(itertools.product((16, 32, 64), (1024, 2048, 4096), (4, 8), (1,)))
        return [Family(f"int4 GEMV {n}x{k} (1 row)", "quant_gemm", qg.PER_SHAPE_KEYS, tiles, [case],
                       scope=gemv.shape_key(n, k), defaults=qg.int4_gemv_tactics(n, k))
                for (n, k), case in zip(shapes, cases)]
    fams = [Family(f"{quant.method} GEMM (decode rows)", "quant_gemm",
                   ("small_block_n", "small_block_k", "small_swap"),
                   list(itertools.product((32, 64), (128, 256), (0, 1))), cases)]
    lib_key = {"fp8": "scaled_mm_min_m", "w8a8": "int_mm_min_m"}.get(quant.method)
    if lib_key is not None:
        # From how many rows the library GEMM (cuBLASLt FP8 / _int_mm) beats the decode tiling: timed at
        # batched-decode row counts, where a 128-wide library tile is half empty.
        wide = []
        for k, copies, isc in projections:  # the same quantized weights as the decode-rows family
            for m in (32, 64):
                x = torch.randn(m, k, generator=g).to(device, dtype)
                wide.append(_cycle(lambda t, x=x, isc=isc: qg.qgemm(x, quant.method, t["qweight"], t["scales"], None,
                                                                   0, isc), copies))
        fams.append(Family(f"{quant.method} library GEMM from M rows", "quant_gemm", (lib_key,),
                           [(17,), (33,), (65,)], wide))
    return fams


def tune_family(fam: Family, timer: Timer, tol: float, bar=None, seconds: float = 30.0) -> dict[str, Any]:
    """Time every candidate of ``fam`` (within ``seconds`` per 16 candidates); returns the winner and the
    per-candidate times.
    The module's TACTICS are restored afterwards."""
    tactics = _table(fam)
    saved = dict(tactics)
    default = tuple(saved[k] if k in saved else fam.defaults[k] for k in fam.keys)
    refs = [case() for case in fam.cases]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    seconds *= max(1.0, len(fam.candidates) / 16)  # the budget was set for grids of ~16 variants
    candidates = [default] + [c for c in fam.candidates if c != default]
    try:
        for cand in candidates:
            if bar is not None:
                bar.update(1)
            if time.perf_counter() - t0 > seconds and rows:
                rows.append({"cfg": list(cand), "skipped": "time budget"})
                continue
            tactics.update(zip(fam.keys, cand))
            try:
                for case, ref in zip(fam.cases, refs):
                    out = case()
                    if not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
                        raise ValueError("output differs from the default tactics'")
                ms = sum(timer(case) for case in fam.cases)
                rows.append({"cfg": list(cand), "ms": ms})
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is dropped, not fatal
                rows.append({"cfg": list(cand), "error": f"{type(e).__name__}: {str(e)[:120]}"})
            finally:
                tactics.clear()
                tactics.update(saved)
    finally:
        tactics.clear()
        tactics.update(saved)
    if bar is not None:  # the bar counts the grid plus the default; a default inside the grid ran once
        bar.update(len(fam.candidates) + 1 - len(candidates))
    timed = [r for r in rows if "ms" in r]
    if not timed:
        raise ConfigError(f"tuning {fam.name}: no variant ran, the default included ({rows[0].get('error')}); "
                          "build with --no-tune to skip tuning")
    best = min(timed, key=lambda r: r["ms"])
    default_ms = next((r["ms"] for r in timed if tuple(r["cfg"]) == default), None)
    return {"family": fam.name, "module": fam.module, "scope": fam.scope, "keys": list(fam.keys),
            "winner": dict(zip(fam.keys, best["cfg"])),
            "winner_ms": best["ms"], "default_ms": default_ms, "candidates": rows}


def tune(model: ModelConfig, build: BuildConfig, quant: QuantConfig, device: str = "cuda",
         timer: Timer | None = None, show_progress: bool = True, seconds_per_family: float = 30.0) -> dict[str, Any]:
    """Tactics for ``engine.json``: ``{module: {key: value}}`` plus ``"tuning"`` (what was timed)."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[build.dtype]
    t0 = time.perf_counter()
    fams = _attention_families(model, build, device, dtype)
    if quant.enabled:
        fams += _gemm_families(model, quant, device, dtype)
    fams += _gemv_families(model, quant, device, dtype)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    out: dict[str, Any] = {}
    record = []
    saved = {m: copy.deepcopy(_module(m).TACTICS) for m in TUNABLE_MODULES}  # per_shape is nested
    try:
        with tqdm(total=sum(len(f.candidates) + 1 for f in fams), desc="build: tune kernels", unit="variant",
                  disable=not show_progress) as bar:
            for fam in fams:
                res = tune_family(fam, timer or cuda_graph_timer, tol, bar, seconds_per_family)
                dest = out.setdefault(fam.module, {})
                if fam.scope is not None:
                    dest = dest.setdefault("per_shape", {}).setdefault(fam.scope, {})
                dest.update(res["winner"])
                record.append(res)
                _table(fam).update(res["winner"])  # later families time with these winners
    finally:
        for m, table in saved.items():
            _module(m).TACTICS.clear()
            _module(m).TACTICS.update(table)
    out["tuning"] = {"seconds": round(time.perf_counter() - t0, 1), "families": record}
    return out


def apply_tactics(tactics: dict[str, Any]) -> None:
    """Load an engine's tuned tactics into the kernel modules (CUDA only; ``tuning`` is a record)."""
    for name, overrides in tactics.items():
        if name == "tuning":
            continue
        if name not in TUNABLE_MODULES:
            raise ConfigError(f"engine tactics name an unknown kernel module {name!r}; rebuild the engine with "
                              "this llmc (`llmc build CHECKPOINT -o DIR --device cuda`)")
        table = _module(name).TACTICS
        unknown = sorted(set(overrides) - set(table))
        for shape, keys in (overrides.get("per_shape") or {}).items():
            unknown += [f"per_shape[{shape}].{k}" for k in sorted(set(keys) - set(_module(name).PER_SHAPE_KEYS))]
        if unknown:
            raise ConfigError(f"engine tactics for {name} name unknown keys {unknown}; it was tuned by another "
                              "llmc version: rebuild it (`llmc build CHECKPOINT -o DIR --device cuda`)")
        table.update(overrides)
