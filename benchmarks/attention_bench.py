"""Attention kernels on the GPU (JSON): paged decode at batch 64 x 4096-token contexts as achieved memory
bandwidth, and paged varlen prefill against torch's flash SDPA on the same shapes (contiguous, causal).

    python3 benchmarks/attention_bench.py
Llama-2-7B attention shape: 32 query heads, 32 KV heads, head dim 128, bf16, KV page 16.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.plugins import triton_kernels as tk  # noqa: E402
from llmc.plugins.metadata import AttentionMetadata  # noqa: E402

H, D, PAGE = 32, 128, 16


def paged(q_lens, ctx, dtype=torch.bfloat16):
    nb = sum(-(-c // PAGE) for c in ctx)
    perm = torch.randperm(nb).tolist()
    tables, used = [], 0
    for c in ctx:
        n = -(-c // PAGE)
        tables.append(perm[used:used + n])
        used += n
    meta = AttentionMetadata.build(q_lens, ctx, tables, PAGE, "cuda")
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=dtype)
    kc = torch.randn(nb, PAGE, H, D, device="cuda", dtype=dtype)
    vc = torch.randn(nb, PAGE, H, D, device="cuda", dtype=dtype)
    return q, kc, vc, meta


def main() -> None:
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    q, kc, vc, meta = paged([1] * 64, [4096] * 64)
    ms = triton.testing.do_bench(lambda: tk.paged_attention(q, kc, vc, meta, D ** -0.5), warmup=50, rep=300,
                                 return_mode="median")
    kv_bytes = 2 * 64 * 4096 * H * D * 2
    res["decode_b64_ctx4096"] = {"ms": ms, "GBps": kv_bytes / ms / 1e6}
    for n_seq, L in ((8, 2048), (1, 8192), (32, 512)):
        q, kc, vc, meta = paged([L] * n_seq, [L] * n_seq)
        ours = triton.testing.do_bench(lambda: tk.paged_attention(q, kc, vc, meta, D ** -0.5), warmup=20, rep=200,
                                       return_mode="median")
        qs = torch.randn(n_seq, H, L, D, device="cuda", dtype=torch.bfloat16)
        ks, vs = torch.randn_like(qs), torch.randn_like(qs)
        sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                                       warmup=20, rep=200, return_mode="median")
        flops = 4 * n_seq * H * L * L * D / 2
        res[f"prefill_{n_seq}x{L}"] = {"llmc_ms": ours, "sdpa_ms": sdpa, "ratio": ours / sdpa,
                                       "llmc_TFLOPs": flops / ours / 1e9}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
