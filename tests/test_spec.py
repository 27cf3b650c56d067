"""Speculative decoding never changes what the target would produce: greedy identity for both proposers,
exact distributions under sampling (and a broken rule is caught), and consistent caches after rollbacks."""
from __future__ import annotations

import random

import pytest
import torch

from llmc.runtime.engine import LLMEngine
from llmc.runtime.model_runner import ScheduledSeq
from llmc.runtime.sampling_params import SamplingParams
from llmc.spec import verify as verify_mod
from llmc.spec.decoder import SpecConfig
from llmc.spec.ngram import propose_ngram

# Chi-square critical values at alpha = 1e-3 (df: value), from the chi-square distribution.
CHI2_CRIT = {3: 16.27, 4: 18.47, 5: 20.52, 15: 37.70}


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat themselves, so n-gram lookup has something to propose."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        unit = [rng.randrange(3, 384) for _ in range(rng.randint(2, 9))]
        out.append((unit * 20)[: rng.randint(5, 70)] + [rng.randrange(3, 384) for _ in range(rng.randint(0, 5))])
    return out


def run(engine: LLMEngine, prompts, params):
    reqs = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_used_blocks == 0
    return [[c.token_ids for c in r.final_output().outputs] for r in reqs], reqs


@pytest.fixture(scope="module")
def engines(tiny_factory):
    target = tiny_factory("llama-gqa")[1]
    draft = tiny_factory("llama-tied")[1]
    return target, draft


def test_ngram_proposer():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert propose_ngram([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]
    assert propose_ngram([7, 8, 9], 3) == []


@pytest.mark.parametrize("method,k,blocks", [("ngram", 1, None), ("ngram", 4, None), ("ngram", 8, 24),
                                              ("draft", 3, None), ("draft", 8, 24)])
def test_greedy_identical_with_speculation(engines, method, k, blocks):
    target, draft = engines
    prompts = repetitive_prompts(10, seed=k)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want, _ = run(LLMEngine(target, show_progress=False), prompts, params)
    spec = SpecConfig(method=method, num_speculative_tokens=k, draft_engine=str(draft) if method == "draft" else None,
                      adaptive=False)
    eng = LLMEngine(target, show_progress=False, speculative=spec, num_kv_blocks=blocks)
    got, reqs = run(eng, prompts, params)
    assert got == want
    assert eng.spec.stats.proposed > 0 and eng.spec.stats.accepted > 0
    if blocks:
        assert eng.metrics.num_preemptions > 0, "pool not small enough to preempt"
    if method == "draft":
        assert eng.spec.proposer.kv.num_used_blocks == 0  # draft cache released too


def test_draft_identical_to_target_accepts_everything(tiny_factory):
    target = tiny_factory("llama-gqa")[1]
    eng = LLMEngine(target, show_progress=False,
                    speculative=SpecConfig(method="draft", draft_engine=str(target), num_speculative_tokens=4,
                                           adaptive=False))
    run(eng, repetitive_prompts(4, seed=3), SamplingParams(temperature=0, max_tokens=21, ignore_eos=True))
    assert eng.spec.stats.acceptance_rate == 1.0
    assert eng.spec.stats.mean_accepted_length == pytest.approx(5.0, abs=0.5)


def test_kv_consistent_after_rejections(engines):
    """After many rejected proposals, the cached K/V give the same next-token logits as a recomputation."""
    from tests.test_foundation import runner_logits

    target, _ = engines
    eng = LLMEngine(target, show_progress=False,
                    speculative=SpecConfig(method="ngram", num_speculative_tokens=6, adaptive=False))
    reqs = [eng.add_request(prompt_token_ids=p, params=SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
            for p in repetitive_prompts(3, seed=11)]
    for _ in range(12):
        eng.step()
    assert eng.spec.stats.proposed - eng.spec.stats.accepted > 5, "expected rejections"
    for r in reqs:
        seq = r.states[0].seq
        assert seq.num_computed_tokens == seq.num_tokens - 1
        assert eng.kv.allocate_slots(seq, 1)
        cached = eng.runner.forward([ScheduledSeq(seq, 1, True)])[0]
        fresh = runner_logits(target, seq.token_ids)[-1]
        torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=1e-4)
    for r in reqs:
        eng.abort_request(r.request_id)
    assert eng.kv.num_used_blocks == 0


def test_per_request_override_disables(engines):
    target, _ = engines
    eng = LLMEngine(target, show_progress=False, speculative=SpecConfig(method="ngram", adaptive=False))
    run(eng, repetitive_prompts(3, seed=5), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                           num_speculative_tokens=0))
    assert eng.spec.stats.proposed == 0


# ---------------------------------------------------------------- distribution tests on verify itself
def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def _first_token_counts(verify_fn, p: torch.Tensor, q: torch.Tensor | None, draft_tok: int | None, n: int,
                        seed: int) -> torch.Tensor:
    """Sample the first emitted token n times: proposal drawn from q (or fixed), verified against p."""
    g = torch.Generator().manual_seed(seed)
    V = p.shape[-1]
    target = p.expand(n, 2, V).clone()
    if q is not None:
        drafts = torch.multinomial(q.expand(n, V), 1, replacement=True, generator=g)
        dprobs = q.expand(n, 1, V).clone()
    else:
        drafts = torch.full((n, 1), draft_tok)
        dprobs = None
    torch.manual_seed(seed)
    out = verify_fn(target, drafts, [1] * n, [False] * n, dprobs)
    return torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).float()


@pytest.mark.parametrize("mode", ["draft", "point"])
def test_verify_preserves_target_distribution(mode):
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    q = torch.tensor([0.10, 0.10, 0.50, 0.20, 0.10]) if mode == "draft" else None
    counts = _first_token_counts(verify_mod.verify, p, q, 2, n=20000, seed=0)
    assert _chi2(counts, p) < CHI2_CRIT[4]


def test_broken_acceptance_rule_is_detected(monkeypatch):
    """Accepting every proposal (no rejection step) biases the output; the same test must see it."""
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    q = torch.tensor([0.10, 0.10, 0.50, 0.20, 0.10])

    def broken(target, drafts, num_draft, greedy, draft_probs=None, generators=None):
        # a subtly wrong rule: accept with probability p/q but resample from p instead of the residual
        res = []
        for r in range(target.shape[0]):
            x = int(drafts[r, 0])
            if torch.rand(()) * draft_probs[r, 0, x] < target[r, 0, x]:
                res.append([x, 0])
            else:
                res.append([int(torch.multinomial(target[r, 0], 1))])
        return res

    counts = _first_token_counts(broken, p, q, None, n=20000, seed=1)
    assert _chi2(counts, p) > CHI2_CRIT[4]
    # and a 2% absolute bias is detectable at this sample size
    biased = p + torch.tensor([0.02, -0.02, 0, 0, 0])
    fake = torch.multinomial(biased, 20000, replacement=True, generator=torch.Generator().manual_seed(2))
    assert _chi2(torch.bincount(fake, minlength=5).float(), p) > CHI2_CRIT[4]


def _engine_pair_counts(eng: LLMEngine, prompt: list[int], n: int) -> torch.Tensor:
    # max_tokens 3: the second token is then always produced by a verification step
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True, seed=10_000 + i)
              for i in range(n)]
    reqs = [eng.add_request(prompt_token_ids=prompt, params=p) for p in params]
    while eng.has_unfinished_requests():
        eng.step()
    return [tuple(r.final_output().outputs[0].token_ids[:2]) for r in reqs]


def test_engine_sampling_distribution_with_speculation(engines, monkeypatch):
    """Tiny model, temperature 1, top-k 4: the joint law of the first two tokens with draft-model
    speculation equals the target's exact law (chi-square over 16 cells), and a broken verifier is caught."""
    from tests.test_foundation import runner_logits
    from llmc.runtime.sampler import SamplingBatch, probs_for

    target, draft = engines
    unit = [17, 42, 99, 5]
    prompt = unit * 6
    V = 384

    def law(ids):
        lg = runner_logits(target, ids)[-1:]
        b = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_k=4)], [ids], [[]], V, "cpu", [0])
        return probs_for(lg, b)[0]

    p1 = law(prompt)
    firsts = p1.nonzero().flatten().tolist()
    joint = {(a, b): float(p1[a] * pb) for a in firsts for b, pb in enumerate(law(prompt + [a])) if pb > 0}
    cells = sorted(joint)
    probs = torch.tensor([joint[c] for c in cells])

    def stat(pairs):
        if any(x not in joint for x in pairs):
            return float("inf")  # a pair the target can never produce
        counts = torch.tensor([sum(1 for x in pairs if x == c) for c in cells], dtype=torch.float)
        return _chi2(counts, probs)

    spec = SpecConfig(method="draft", draft_engine=str(draft), num_speculative_tokens=2, adaptive=False)
    eng = LLMEngine(target, show_progress=False, speculative=spec, max_batch_size=16)
    pairs = _engine_pair_counts(eng, prompt, 1200)
    assert eng.spec.stats.proposed > 0
    assert stat(pairs) < CHI2_CRIT[15]

    def accept_all(target_probs, draft_tokens, num_draft, greedy, draft_probs=None, generators=None):
        return [draft_tokens[r, :num_draft[r]].tolist() + [int(target_probs[r, num_draft[r]].argmax())]
                for r in range(target_probs.shape[0])]

    monkeypatch.setattr("llmc.spec.decoder.verify", accept_all)
    eng2 = LLMEngine(target, show_progress=False, speculative=spec, max_batch_size=16)
    assert stat(_engine_pair_counts(eng2, prompt, 1200)) > CHI2_CRIT[15]
