"""How far the fused producers (RMSNorm / SwiGLU writing fp8 or int8 rows) are from the unfused ops, in bits,
at Llama widths on the GPU: the share of quantized values and of row scales that differ, and by how many steps.

    python benchmarks/fusion_bits.py [--rows 300]

Three comparisons per case: fused vs the unfused Triton ops (norm kernel, then the activation-quantization
kernel); fused vs torch quantizing the unfused norm's bf16 output; fused vs torch quantizing the *unrounded*
fp32 norm (what the fused kernel would give if the compiler dropped its round trip through bf16).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.plugins import quant_gemm as qg  # noqa: E402
from llmc.plugins import triton_kernels as tk  # noqa: E402
from llmc.plugins.act_quant import quantize_rows  # noqa: E402


def compare(a, b) -> dict:
    qa, qb = a[0].float(), b[0].float()
    diff = (qa - qb).abs()
    return {"values_differ": float((diff > 0).float().mean()), "max_abs_q_diff": float(diff.max()),
            "scales_differ": float((a[1] != b[1]).float().mean()),
            "max_scale_rel_diff": float(((a[1] - b[1]).abs() / b[1]).max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    out = {"gpu": torch.cuda.get_device_name(), "cases": []}
    for n in (4096, 8192):
        x = torch.randn(a.rows, n, generator=g).cuda().bfloat16()
        r = torch.randn(a.rows, n, generator=g).cuda().bfloat16()
        w = torch.randn(n, generator=g).cuda().bfloat16()
        for method in ("fp8", "w8a8"):
            fused = tk.fused_add_rms_norm_quant(x, r, w, 1e-5, method)[0]
            normed, res = tk.fused_add_rms_norm(x, r, w, 1e-5)
            unf = qg.quantize_activations(normed, method, None)
            host = quantize_rows(normed, method, None)
            resf = res.float()
            unrounded = resf * torch.rsqrt(resf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
            host32 = quantize_rows(unrounded, method, None)
            f = (fused.q, fused.scale)
            out["cases"].append({"op": "fused_add_rms_norm_quant", "width": n, "method": method,
                                 "vs_unfused_kernels": compare(f, unf),
                                 "vs_torch_on_bf16_norm": compare(f, (host.q, host.scale)),
                                 "vs_torch_on_fp32_norm": compare(f, (host32.q, host32.scale))})
    gu = torch.randn(a.rows, 2 * 11008, generator=g).cuda().bfloat16()
    for method in ("fp8", "w8a8"):
        fused = tk.silu_and_mul_quant(gu, method)
        act = tk.silu_and_mul(gu)
        unf = qg.quantize_activations(act, method, None)
        host = quantize_rows(act, method, None)
        out["cases"].append({"op": "silu_and_mul_quant", "width": 11008, "method": method,
                             "vs_unfused_kernels": compare((fused.q, fused.scale), unf),
                             "vs_torch_on_bf16_act": compare((fused.q, fused.scale), (host.q, host.scale))})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
