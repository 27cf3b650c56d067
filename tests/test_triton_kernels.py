"""Triton kernels against their CPU references on random inputs: on the GPU when there is one, else on
the CPU under the Triton interpreter (small shapes)."""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the triton import
triton = pytest.importorskip("triton")

from llmc.plugins import reference  # noqa: E402
from llmc.plugins import triton_kernels as tk  # noqa: E402
from llmc.plugins.metadata import AttentionMetadata  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(q_lens, ctx_lens, hq, hkv, d, page, dtype, seed):
    """Random q, a random cache, and scrambled block tables for sequences of the given shapes."""
    g = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-c // page) for c in ctx_lens) + 3
    perm = torch.randperm(total_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in ctx_lens:
        nb = -(-c // page)
        tables.append(perm[used:used + nb])
        used += nb
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, page, DEV)
    T = sum(q_lens)
    q = torch.randn(T, hq, d, generator=g).to(DEV, dtype)
    kc = torch.randn(total_blocks, page, hkv, d, generator=g).to(DEV, dtype)
    vc = torch.randn(total_blocks, page, hkv, d, generator=g).to(DEV, dtype)
    return q, kc, vc, meta


CASES = [  # (q_lens, ctx_lens, hq, hkv, page)
    ([1, 1, 1], [1, 17, 40], 4, 4, 16),
    ([1, 1], [33, 64], 6, 2, 16),  # GQA 3
    ([1, 1, 1, 1], [5, 100, 16, 31], 8, 2, 32),  # GQA 4, page 32
    ([7, 1, 12, 1], [7, 20, 40, 3], 4, 1, 16),  # mixed prefill (with cached prefix) + decode
    ([70, 1, 33], [100, 9, 33], 8, 2, 32),  # prefill longer than one 64-row tile, prefix of 30, GQA 4
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32])
def test_paged_attention_matches_reference(case, dtype):
    q_lens, ctx, hq, hkv, page = CASES[case]
    q, kc, vc, meta = make_batch(q_lens, ctx, hq, hkv, 64 if DEV == "cpu" else 128, page, dtype, seed=case)
    scale = q.shape[-1] ** -0.5
    ref = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, scale)
    out = tk.paged_attention(q, kc, vc, meta, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_decode_splits_agree(splits):
    q, kc, vc, meta = make_batch([1, 1], [70, 129], 4, 2, 64, 16, torch.float32, seed=7)
    ref = reference.paged_attention(q, kc, vc, meta, 0.125)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    tk.paged_decode(q, kc, vc, meta, 0.125, out, torch.arange(2, dtype=torch.int32, device=DEV), num_splits=splits)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_write_kv_matches_reference_and_skips_padding():
    g = torch.Generator().manual_seed(3)
    T, H, D, nb, page = 9, 2, 32, 6, 16
    qkv = torch.randn(T, 4 * H * D, generator=g).to(DEV)
    k = qkv[:, : H * D].reshape(T, H, D)  # strided views, as in the model
    v = qkv[:, H * D: 2 * H * D].reshape(T, H, D)
    slots = random.Random(0).sample(range(nb * page), T)
    slots[4] = -1
    slot_t = torch.tensor(slots, device=DEV)
    kc = torch.randn(nb, page, H, D, generator=g).to(DEV)
    vc = torch.randn(nb, page, H, D, generator=g).to(DEV)
    kr, vr = kc.clone(), vc.clone()
    reference.write_kv(k, v, kr, vr, slot_t)
    tk.write_kv(k, v, kc, vc, slot_t)
    torch.testing.assert_close(kc, kr)
    torch.testing.assert_close(vc, vr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32])
def test_small_fused_ops_match_reference(dtype):
    g = torch.Generator().manual_seed(5)
    T, H = 7, 96
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    r = torch.randn(T, H, generator=g).to(DEV, dtype)
    w = torch.randn(H, generator=g).to(DEV, dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tk.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **tol)
    for got, want in zip(tk.fused_add_rms_norm(x, r, w, 1e-5), reference.fused_add_rms_norm(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, **tol)
    gu = torch.randn(T, 2 * 80, generator=g).to(DEV, dtype)
    torch.testing.assert_close(tk.silu_and_mul(gu), reference.silu_and_mul(gu), **tol)
    # rope on strided q/k views of a fused qkv, as the model calls it
    hq, hk, d = 4, 2, 32
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(DEV, dtype)
    q = qkv[:, : hq * d].reshape(T, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].reshape(T, hk, d)
    cs = torch.randn(64, d, generator=g).to(DEV)
    pos = torch.tensor([0, 5, 63, 7, 7, 1, 30], device=DEV)
    for got, want in zip(tk.rotary_embedding(pos, q, k, cs), reference.rotary_embedding(pos, q, k, cs)):
        torch.testing.assert_close(got, want, **tol)
