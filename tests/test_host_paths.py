"""The per-step host fast paths (decode tokens, typed-array uploads) give exactly what the general paths give."""
from __future__ import annotations

import random

import pytest
import torch

from llmc.plugins.metadata import AttentionMetadata, upload
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import PENDING_TOKEN, Sequence


@pytest.mark.parametrize("seed", range(20))
def test_token_at_matches_token_slice(seed):
    rng = random.Random(seed)
    seq = Sequence("r", [rng.randrange(1000) for _ in range(rng.randint(1, 9))], SamplingParams())
    seq.output_token_ids = [rng.randrange(1000) for _ in range(rng.randint(0, 5))]
    seq.num_pending = rng.randint(0, 2)
    seq.spec_token_ids = [rng.randrange(1000) for _ in range(rng.randint(0, 3))]
    total = seq.num_tokens + len(seq.spec_token_ids)
    assert [seq.token_at(i) for i in range(total)] == seq.token_slice(0, total)
    if seq.num_pending:
        assert seq.token_at(seq.num_known_tokens) == PENDING_TOKEN


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
def test_upload_typed_arrays_equal_torch_tensor(dtype):
    rng = random.Random(0)
    lists = [[rng.randrange(-2**31, 2**31 - 1) for _ in range(rng.randint(0, 40))] for _ in range(6)] + [[]]
    if dtype is torch.float32:
        lists[0] = [rng.uniform(-1e6, 1e6) for _ in range(30)]
    got = upload(lists, "cpu", dtype)
    for g, want in zip(got, lists):
        assert g.dtype == dtype and torch.equal(g, torch.tensor(want, dtype=dtype))


def test_upload_falls_back_for_values_an_array_refuses():
    big, frac = upload([[2**62, -2**62]], "cpu")[0], upload([[1.75, 2]], "cpu")[0]
    assert big.tolist() == [2**62, -2**62]
    assert torch.equal(frac, torch.tensor([1.75, 2], dtype=torch.int64))  # what torch.tensor itself does
    assert upload([[], []], "cpu")[0].numel() == 0


def test_decode_slot_fast_path_matches_general_loop():
    """Mixed prefill chunks and decode tokens: slots equal the per-position formula."""
    rng = random.Random(1)
    bs, q_lens, s_lens, tables = 4, [], [], []
    for _ in range(12):
        s = rng.randint(1, 30)
        q = 1 if rng.random() < 0.6 else rng.randint(1, s)
        q_lens.append(q)
        s_lens.append(s)
        tables.append(rng.sample(range(100), -(-s // bs)))
    meta = AttentionMetadata.build(q_lens, s_lens, tables, bs)
    want = [t[p // bs] * bs + p % bs for q, s, t in zip(q_lens, s_lens, tables) for p in range(s - q, s)]
    assert meta.slot_mapping.tolist() == want


def test_decode_allocation_fast_path_still_copies_shared_blocks():
    """A decode token into a block this sequence alone holds is written in place; into a shared or
    registered block it is copied first, as before the fast path."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = Sequence("r", list(range(6)), SamplingParams())
    assert kv.allocate_slots(seq, 6)
    seq.num_computed_tokens = 6
    table = list(seq.block_table)
    assert kv.allocate_slots(seq, 1) and seq.block_table == table and kv.take_pending_copies() == []
    child = Sequence("r", list(range(6)), SamplingParams(), num_computed_tokens=6)
    kv.fork(seq, child)
    assert kv.allocate_slots(child, 1)
    assert kv.take_pending_copies() == [(table[1], child.block_table[1])]
    kv.check_invariants([seq, child])
