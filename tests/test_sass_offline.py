"""Triton kernels compiled for sm_90 on the CPU (``benchmarks/sass_profile.py``): compiled Triton
refuses code the interpreter accepts (a jit helper whose branches return different dtypes cost a device call),
and a change that makes the default tiles spill registers is a slowdown no CPU test would otherwise see.
Runs in a subprocess: under TRITON_INTERPRET=1 (set by the kernel tests) nothing can be compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.is_file(), reason="this triton wheel ships no ptxas")


def profile(kv: str, group: int, head_dim: int) -> dict:
    """Compile with the tiles ``paged_decode`` launches (``decode_tiles``: TACTICS fitted to shared memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"""
import json, subprocess, sys
from llmc.plugins import triton_kernels as tk
_, bn, warps, st = tk.decode_tiles({group}, {head_dim}, {kv!r} != "bf16", 2)  # bf16 q: 2-byte dot tiles
sys.argv = ["sass_profile", "--json", "--kv", {kv!r}, "--block-n", str(bn), "--stages", str(st),
            "--warps", str(warps), "--group", "{group}", "--head-dim", "{head_dim}"]
sys.path.insert(0, "benchmarks")
import sass_profile
sass_profile.main()
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("kv,group,head_dim", [("bf16", 1, 128), ("fp8", 1, 128), ("int8", 4, 128),
                                               ("bf16", 8, 64), ("bf16", 2, 256), ("fp8", 1, 256)])
def test_decode_kernel_compiles_for_hopper_without_spills(kv, group, head_dim):
    """1-byte caches compile as the engine lays them out (V pages head_dim-major). Head dim 256 relies on ``_fit_tiles`` halving the 128-token 1-byte tile: compiled at 128 it spills
    (offline: 72 bytes at 255 registers)."""
    res = profile(kv, group, head_dim)
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res
    assert res["loop_mix"].get("HMMA.16816", 0) > 0, res["loop_mix"]  # the dots run on tensor cores
    if kv != "bf16":  # head_dim-major V pages: no byte-wide shared-memory reads (row-major V: 128 per tile)
        assert res["loop_mix"].get("LDS.U8", 0) == 0, res["loop_mix"]
    assert 0 < res["registers"] <= 255 and res["shared_bytes"] <= 227 * 1024


def test_prefill_kv_write_and_fused_producer_kernels_compile_for_hopper():
    """The other kernels of a decode/prefill step at Llama-2-7B widths, default TACTICS (GEMVs included)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/sass_profile.py", "--specs"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    usage = json.loads(r.stdout)
    assert len(usage) >= 12
    for name, u in usage.items():
        if name.startswith("prefill fp8 cache"):
            # fp16 dots with V scales relative to the tile's largest spill 36 bytes at 255 registers (known,
            # BENCHMARKS.md: the spill-free 8-warp tiles measured slower on the H200); bound it
            assert u["spill_stores"] <= 64 and u["spill_loads"] <= 64, (name, u)
        else:
            assert u["spill_stores"] == 0 and u["spill_loads"] == 0, (name, u)
        if "gemv" in name or "mma" in name:  # full-rate conversions (the int4 tiles had an I2F per nibble)
            assert u["loop_i2f"] == 0, (name, u)
        if "gemv" in name:  # vector weight loads (byte loads were 67 per int4 tile); int4 zero points are bytes
            assert u["loop_byte_loads"] <= (1 if "int4" in name else 0), (name, u)
