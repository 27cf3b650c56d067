"""Compile Triton kernels for sm_90 without a GPU and report what the GPU would run.

    python3 benchmarks/sass_profile.py [--kv fp8|bf16|int8] [--block-n 64] [--warps 4] [--stages 2] [--json]
    python3 benchmarks/sass_profile.py --specs     # prefill, KV writes, fused producers, GEMVs: ptxas usage

Triton's compiler and the ``ptxas``/``nvdisasm`` binaries shipped in its wheel work on a CPU-only machine,
so register use, spills, shared memory and the instruction mix of the main loop can be read before a device
call is spent. It caught what the interpreter cannot show: 1-byte K/V tiles are read from shared memory a
byte at a time (``LDS.U8``) and converted twice, ~1.9x bf16's instructions per tile (BENCHMARKS.md,
third session). Instruction counts are not times: a variant with fewer instructions and more registers
measured slower on the H200 (fewer programs per SM). Runtime specializations are mirrored (pointer and
stride arguments divisible by 16, as the launches pass them), or every load would compile scalar.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_KV_TYPES = {"bf16": "*bf16", "fp8": "*fp8e4nv", "int8": "*i8"}


def compile_kernel(fn, ptrs: dict[str, str], const: dict, warps: int = 4, stages: int = 2, floats=(),
                   arch: int = 90):
    """``fn`` compiled for ``sm_{arch}``: ``ptrs`` names each pointer argument's Triton type ("*bf16"),
    ``const`` the constexprs, ``floats`` the fp32 scalars; every other argument is an i32 that, like a launch
    passing a stride or count divisible by 16, is marked so (unless the kernel exempts it)."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise SystemExit("TRITON_INTERPRET=1 is set: the kernels are interpreted, there is nothing to compile")
    names = fn.arg_names
    if "PDL" in names:  # as launched on sm_90: programmatic dependent launch on
        const = {"PDL": True, **const}
    missing = (set(const) | set(ptrs) | set(floats)) - set(names)
    if missing:
        raise SystemExit(f"{fn.__name__} has no {sorted(missing)}: update its spec to the kernel's signature")
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n in floats else "i32") for n in names}
    exempt = set(floats) | {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] != "constexpr" and n not in exempt}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def v_strides(quant: bool, v_rowmajor: bool = False, write: bool = False) -> dict:
    """The V-pool stride a launch passes as 1 (Triton specializes it to a constant): head_dim's in row-major
    pages, the token row's in the head_dim-major pages of 1-byte caches (``kv_layout.py``); for the
    attention kernels also their ``V_DMAJOR``."""
    dmajor = quant and not v_rowmajor
    if write:
        return {"stride_vcs" if dmajor else "stride_vcd": 1}
    return {"stride_vs" if dmajor else "stride_vd": 1, "V_DMAJOR": dmajor}


def compile_decode(kv: str = "bf16", block_n: int = 64, warps: int = 4, stages: int = 2, heads: int = 32,
                   group: int = 1, head_dim: int = 128, page: int = 16, arch: int = 90, v_rowmajor: bool = False):
    """``_decode_kernel`` as ``paged_decode`` launches it for a bf16 model (decode-only batch, no split)."""
    from llmc.plugins import triton_kernels as tk

    quant = kv != "bf16"
    const = dict(NUM_Q_HEADS=heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=head_dim,
                 PAGE=page, BLOCK_N=block_n, DECODE_ONLY=True, SPLIT=False, USE_DOT=True, IEEE=False,
                 QUANT=quant, **v_strides(quant, v_rowmajor))
    ptrs = {"q_ptr": "*bf16", "out_ptr": "*bf16", "kc_ptr": _KV_TYPES[kv], "vc_ptr": _KV_TYPES[kv],
            "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "ws_acc_ptr": "*fp32", "bt_ptr": "*i32",
            "seqlen_ptr": "*i32", "qsl_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32"}
    return compile_kernel(tk._decode_kernel, ptrs, const, warps, stages, ("qk_scale",), arch)


def kernel_specs() -> dict[str, tuple]:
    """(kernel, pointer types, constexprs, warps, stages, fp32 scalars) of launches the model makes at Llama-2-7B
    widths, with the default TACTICS: what CI compiles for sm_90 (``tests/test_sass_offline.py``)."""
    from llmc.plugins import gemv
    from llmc.plugins import quant_gemm as qg
    from llmc.plugins import triton_kernels as tk

    t, gt, qt = tk.TACTICS, gemv.TACTICS, qg.TACTICS
    def gemv_spec(w: str, x: str, q8: bool, norm: bool = False, residual: bool = False, half: bool = False,
                  swiglu: bool = False, **tiles) -> tuple:
        """One decode row at the default tiles of its weight width (``gemv.shape_tactics``, no tuned shapes),
        or at ``tiles`` (PER_SHAPE_KEYS); ``half``: f16 products (fp8 rows and weights, ``q8_half``)."""
        d = {**gemv.shape_tactics(1 if q8 else 2, 0, 0, half), **tiles}
        return (gemv._gemv_kernel, {"x_ptr": x, "xs_ptr": "*fp32", "w_ptr": w, "ws_ptr": "*fp32", "b_ptr": "*bf16",
                                    "r_ptr": "*bf16", "out_ptr": "*bf16"},
                dict(X_SCALED=x != "*bf16", W_SCALED=q8, HAS_BIAS=False, NORM=norm, RESIDUAL=residual,
                     EVICT_FIRST=bool(gt["evict_first"]),
                     BLOCK_M=1, X_VECTOR=bool(d["x_vector"]), BLOCK_N=d["block_n"], BLOCK_K=d["block_k"],
                     PREFETCH=bool(gt["prefetch"]), STAGES=d["stages"], HALF=half,
                     TAIL_FIRST=gemv.tail_first(half), SWIGLU=swiglu),
                d["num_warps"], d["stages"], ("eps",))
    kv8 = {"kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "vs_ptr": "*fp32"}
    fp8_kv = dict(QUANT=True, QMAX=448.0, IS_INT=False, ROUND_FP8=False)
    prefill = lambda q, kv, quant: (  # noqa: E731
        tk._prefill_kernel, {"q_ptr": q, "out_ptr": q, "kc_ptr": kv, "vc_ptr": kv, "bt_ptr": "*i32",
                             "seqlen_ptr": "*i32", "qsl_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32"},
        dict(GROUP=4, D=128, PAGE=16, BLOCK_M=t["prefill_block_m"], BLOCK_N=t["prefill_block_n"], SEARCH_STEPS=12,
             SKIP_DECODE=True, IEEE=False, QUANT=quant, **v_strides(quant)),
        t["prefill_num_warps"], t["prefill_num_stages"], ("qk_scale",))
    int4_gemv = lambda words: (  # noqa: E731
        qg._int4_gemv_kernel, {"x_ptr": "*bf16", "isc_ptr": "*fp32", "w_ptr": "*i32" if words else "*u8",
                               "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16", "out_ptr": "*bf16",
                               "part_ptr": "*fp32"},
        dict(GROUP=128, HAS_ISC=False, HAS_BIAS=False, SPLIT=1, WORDS=words, BLOCK_N=qt["gemv_block_n"],
             BLOCK_K=qt["gemv_block_k"], STAGES=qt["gemv_num_stages"]),
        qt["gemv_num_warps"], qt["gemv_num_stages"], ())
    return {
        "prefill bf16 cache": prefill("*bf16", "*bf16", False),
        "prefill fp8 cache": prefill("*bf16", "*fp8e4nv", True),
        "prefill fp8 cache, fp16 model": prefill("*fp16", "*fp8e4nv", True),
        "write_kv fp8": (tk._write_kv_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i64", **kv8},
                         dict(PAGE=16, H=32, H_PAD=32, D=128, D_PAD=128, **fp8_kv, **v_strides(True, write=True)),
                         t["small_num_warps"], 1, ()),
        "rope_write_kv fp8": (tk._rope_write_kv_kernel,
                              {"pos_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
                               "qo_ptr": "*bf16", "slot_ptr": "*i64", "cs_ptr": "*fp32", **kv8},
                              dict(HQ=32, HQ_PAD=32, HK=8, HK_PAD=8, HALF=64, PAGE=16, **fp8_kv,
                                   **v_strides(True, write=True)),
                              t["small_num_warps"], 1, ()),
        "fused_add_rms_norm_quant fp8": (tk._rms_norm_kernel,
                                         {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16",
                                          "out_ptr": "*fp8e4nv", "res_out_ptr": "*bf16", "isc_ptr": "*fp32",
                                          "s_ptr": "*fp32"},
                                         dict(N=4096, BLOCK=4096, HAS_RES=True, QUANT=True, IS_FP8=True,
                                              HAS_ISC=False, ROUND_FP8=False), 8, 1, ("eps",)),
        "gemv bf16": gemv_spec("*bf16", "*bf16", False),
        "gemv bf16, RMS norm fused": gemv_spec("*bf16", "*bf16", False, norm=True),
        "gemv bf16, residual fused": gemv_spec("*bf16", "*bf16", False, residual=True),
        "gemv bf16, SwiGLU fused": gemv_spec("*bf16", "*bf16", False, swiglu=True),
        "gemv int8 weights, SwiGLU fused": gemv_spec("*i8", "*bf16", True, swiglu=True),
        "gemv bf16, unpipelined": gemv_spec("*bf16", "*bf16", False, stages=1, block_k=512, x_vector=0),
        "gemv fp8 rows": gemv_spec("*fp8e4nv", "*fp8e4nv", True, half=bool(gt["q8_half"])),
        "gemv fp8 rows, fp32 products": gemv_spec("*fp8e4nv", "*fp8e4nv", True),
        "gemv int8 weights": gemv_spec("*i8", "*bf16", True),
        "int4 gemv g128, fp32 words": int4_gemv(2),
        "int4 gemv g128, fp16 pairs": int4_gemv(3),
        "int4 mma g128, 16 rows": (qg._qgemm_kernel,
                                   {"x_ptr": "*bf16", "xs_ptr": "*fp32", "isc_ptr": "*fp32", "w_ptr": "*u8",
                                    "s_ptr": "*fp32", "z_ptr": "*u8", "b_ptr": "*bf16", "out_ptr": "*bf16",
                                    "part_ptr": "*fp32"},
                                   dict(W_INT4=True, GROUP=128, X_QUANT=False, HAS_ISC=False, HAS_BIAS=False, SPLIT=1,
                                        IEEE=False, NATIVE_DOT=True, SWAP=bool(qt["small_swap"]), FUSE_ACT=False,
                                        ACT_FP8=False, BLOCK_M=16, BLOCK_N=qt["small_block_n"],
                                        BLOCK_K=qt["small_block_k"]),
                                   qt["small_num_warps"], qt["small_num_stages"], ()),
        "silu_and_mul_quant w8a8": (tk._silu_mul_quant_kernel,
                                    {"x_ptr": "*bf16", "isc_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32"},
                                    dict(I=11008, BLOCK=16384, IS_FP8=False, HAS_ISC=True, ROUND_FP8=False), 16, 1,
                                    ()),
    }


def ptxas_usage(kernel, arch: int = 90) -> dict:
    """Registers, spill bytes and stack from ``ptxas -v`` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        r = subprocess.run([str(_BIN / "ptxas"), "-v", "--gpu-name", f"sm_{arch}a", str(ptx), "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    info = r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "shared_bytes": kernel.metadata.shared}


def spec_usage(kernel) -> dict:
    """``ptxas_usage`` plus, in the main loop, its instructions, global loads (byte-wide ones apart) and
    quarter-rate int -> float conversions (``I2F``): the int4 GEMV once read its packed weight a byte per
    load and converted every nibble so."""
    mix = loop_mix(kernel, modifiers=4)
    return {**ptxas_usage(kernel), "loop_instructions": sum(mix.values()),
            "loop_global_loads": sum(c for op, c in mix.items() if op.startswith("LDG")),
            "loop_byte_loads": sum(c for op, c in mix.items() if op.startswith("LDG") and ".U8" in op),
            "loop_i2f": sum(c for op, c in mix.items() if op.startswith("I2F"))}


def loop_mix(kernel, modifiers: int = 1) -> Counter:
    """SASS opcodes (with their first ``modifiers`` modifiers) of the longest backward-branch loop: the K/V
    tile loop."""
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        lines = subprocess.run([str(_BIN / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels = {ln.strip()[:-1]: i for i, ln in enumerate(lines) if re.fullmatch(r"\.L_x_\d+:", ln.strip())}
    best = (0, 0, -1)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[0]:
            best = (i - labels[m.group(1)], labels[m.group(1)], i)
    mix: Counter = Counter()
    for ln in lines[best[1]:best[2] + 1]:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)((?:\.[A-Z0-9_]+)*)", ln)
        if m:
            mix[m.group(1) + ".".join(m.group(2).split(".")[:modifiers + 1])] += 1
    return mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv", choices=sorted(_KV_TYPES), default="fp8")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--group", type=int, default=1, help="query heads per KV head (GQA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--v-rowmajor", action="store_true", help="1-byte V pages row-major (not the engine's layout)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a summary")
    ap.add_argument("--specs", action="store_true",
                    help="compile every kernel of kernel_specs() instead; JSON of each one's ptxas usage")
    a = ap.parse_args()
    if a.specs:
        print(json.dumps({name: spec_usage(compile_kernel(*spec)) for name, spec in kernel_specs().items()},
                         indent=1))
        return
    k = compile_decode(a.kv, a.block_n, a.warps, a.stages, group=a.group, head_dim=a.head_dim,
                       v_rowmajor=a.v_rowmajor)
    mix = loop_mix(k)
    res = {"kv": a.kv, "v_rowmajor": a.v_rowmajor, "block_n": a.block_n, "warps": a.warps, "stages": a.stages,
           "group": a.group, "head_dim": a.head_dim, **ptxas_usage(k),
           "loop_instructions": sum(mix.values()), "loop_mix": dict(mix.most_common())}
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(" ".join(f"{key}={v}" for key, v in res.items() if key != "loop_mix"))
    print("  " + ", ".join(f"{op}:{n}" for op, n in mix.most_common(16)))


if __name__ == "__main__":
    main()
