"""The per-step host fast paths (decode tokens, typed-array uploads) give exactly what the general paths give."""
from __future__ import annotations

import itertools
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


def _reference_law(logits: torch.Tensor, p: SamplingParams, outs: list[int], banned: list[int]) -> torch.Tensor:
    """One row's sampling law, written out plainly: presence penalty, bans, temperature, top-k, top-p, min-p."""
    lg = logits.double().clone()
    for t in set(outs):
        lg[t] -= p.presence_penalty
    lg[banned] = float("-inf")
    probs = torch.softmax(lg / p.temperature, -1)
    order = probs.argsort(descending=True).tolist()
    if p.top_k:
        for t in order[p.top_k:]:
            probs[t] = 0
        probs /= probs.sum()
    if p.top_p < 1:
        mass = 0.0
        for t in order:
            if mass >= p.top_p:
                probs[t] = 0
            mass += float(probs[t])
        probs /= probs.sum()
    if p.min_p:
        probs[probs < p.min_p * probs.max()] = 0
        probs /= probs.sum()
    return probs.float()


def test_sampler_draws_follow_the_exact_distribution_and_leave_logits_alone():
    """Each row's draws (top-k, top-p, min-p, temperature, greedy, a presence penalty, min_tokens bans, mixed
    in one batch) follow the law written out by ``_reference_law`` (chi-square, p = 0.001), and the caller's
    logits are never written: the sampler reads graph-owned logits in place when nothing needs changing."""
    from llmc.runtime.sampler import Sampler, SamplingBatch
    from tests.test_spec import _chi2

    crit = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}  # chi-square at p = 0.001, by degrees of freedom
    torch.manual_seed(0)
    V, copies, outs = 6, 3000, [1, 4]
    base = torch.randn(V) * 1.5
    kinds = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
             SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=1.3, min_p=0.2),
             SamplingParams(temperature=1.0, presence_penalty=1.5), SamplingParams(temperature=0)]
    for case in ("plain", "penalty", "bans"):  # plain: nothing to apply, so the sampler reads the logits in place
        rows = [k for k in kinds if case == "penalty" or not k.presence_penalty]
        bans = [[2] if case == "bans" and i % 2 == 0 else [] for i in range(len(rows))]  # token 2 stands for EOS
        params = [p for p in rows for _ in range(copies)]
        logits = base.repeat(len(params), 1)
        before = logits.clone()
        b = SamplingBatch.from_params(params, [[0]] * len(params), [outs] * len(params), V, "cpu",
                                      [0] * len(params))
        if any(bans):
            b.banned_token_ids = [bans[i // copies] for i in range(len(params))]
        tokens = Sampler()(logits, b).token_ids
        assert torch.equal(logits, before), case
        for k, p in enumerate(rows):
            drawn = tokens[k * copies:(k + 1) * copies]
            if p.temperature == 0:
                lg = base.clone()
                lg[bans[k]] = float("-inf")
                assert (drawn == int(lg.argmax())).all(), case
                continue
            law = _reference_law(base, p, outs if p.presence_penalty else [], bans[k])
            counts = torch.bincount(drawn, minlength=V).float()
            assert counts[law == 0].sum() == 0, f"{case}, row kind {k} drew a token its law excludes"
            df = int((law > 0).sum()) - 1
            if df:
                assert _chi2(counts, law) < crit[df], f"{case}, row kind {k}: {counts.tolist()} vs {law.tolist()}"


def test_fast_detokenizer_equals_the_wrapper(smol_engine):
    """The Rust decode the detokenizer calls directly gives the wrapper's text: random id windows (special
    tokens included, both skip settings), and whole incremental streams with multi-byte characters."""
    from transformers import AutoTokenizer

    from llmc.runtime.detokenizer import IncrementalDetokenizer, fast_decoder

    tok = AutoTokenizer.from_pretrained(str(smol_engine / "tokenizer"))
    backend = fast_decoder(tok)
    assert backend is not None, f"{type(tok).__name__} should take the fast path"
    rng = random.Random(0)
    specials = tok.all_special_ids
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok))
               for _ in range(rng.randint(1, 8))]
        for skip in (True, False):
            assert backend.decode(ids, skip_special_tokens=skip) == tok.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), ids
    ids = tok.encode("Über naïve café, 東京タワー 🚀🚀 x = 42; " * 6)
    for i in range(3, len(ids), 11):  # special tokens inside the streams, so the skip setting matters
        ids[i] = specials[i % len(specials)]
    for start, skip in itertools.product(range(0, len(ids) - 40, 7), (True, False)):
        fast = IncrementalDetokenizer(tok, ids[start:start + 5], stop=["🚀 x"], skip_special_tokens=skip)
        slow = IncrementalDetokenizer(tok, ids[start:start + 5], stop=["🚀 x"], skip_special_tokens=skip)
        slow.backend = None
        for t in ids[start + 5:start + 40]:
            fast.add(t)
            slow.add(t)
            assert (fast.text, fast.stopped_by, fast.take_delta(False)) == (slow.text, slow.stopped_by,
                                                                            slow.take_delta(False))
