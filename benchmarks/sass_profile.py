"""Compile the paged decode-attention kernel for sm_90 without a GPU and report what the GPU would run.

    python3 benchmarks/sass_profile.py [--kv fp8|bf16|int8] [--block-n 64] [--warps 4] [--stages 2] [--json]

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


def compile_decode(kv: str = "bf16", block_n: int = 64, warps: int = 4, stages: int = 2, heads: int = 32,
                   group: int = 1, head_dim: int = 128, page: int = 16, arch: int = 90):
    """``_decode_kernel`` compiled for ``sm_{arch}`` as ``paged_decode`` launches it for a bf16 model
    (decode-only batch, no split)."""
    from llmc.plugins import triton_kernels as tk

    fn = tk._decode_kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise SystemExit("TRITON_INTERPRET=1 is set: the kernels are interpreted, there is nothing to compile")
    quant = kv != "bf16"
    const = dict(NUM_Q_HEADS=heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=head_dim,
                 PAGE=page, BLOCK_N=block_n, DECODE_ONLY=True, SPLIT=False, USE_DOT=True, IEEE=False,
                 QUANT=quant, P_NORM=False)
    ptrs = {"q_ptr": "*bf16", "out_ptr": "*bf16", "kc_ptr": _KV_TYPES[kv], "vc_ptr": _KV_TYPES[kv],
            "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "ws_acc_ptr": "*fp32", "bt_ptr": "*i32",
            "seqlen_ptr": "*i32", "qsl_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32"}
    names = fn.arg_names
    missing = set(const) - set(names)
    if missing:
        raise SystemExit(f"_decode_kernel has no {sorted(missing)}: update compile_decode to its signature")
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    exempt = {"qk_scale"} | {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] != "constexpr" and n not in exempt}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


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


def loop_mix(kernel) -> Counter:
    """SASS opcodes (with their first modifiers) of the longest backward-branch loop: the K/V tile loop."""
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
            mix[m.group(1) + ".".join(m.group(2).split(".")[:2])] += 1
    return mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv", choices=sorted(_KV_TYPES), default="fp8")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--group", type=int, default=1, help="query heads per KV head (GQA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a summary")
    a = ap.parse_args()
    k = compile_decode(a.kv, a.block_n, a.warps, a.stages, group=a.group, head_dim=a.head_dim)
    mix = loop_mix(k)
    res = {"kv": a.kv, "block_n": a.block_n, "warps": a.warps, "stages": a.stages, "group": a.group,
           "head_dim": a.head_dim, **ptxas_usage(k),
           "loop_instructions": sum(mix.values()), "loop_mix": dict(mix.most_common())}
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(" ".join(f"{key}={v}" for key, v in res.items() if key != "loop_mix"))
    print("  " + ", ".join(f"{op}:{n}" for op, n in mix.most_common(16)))


if __name__ == "__main__":
    main()
