"""Runtime: in-flight batching, chunked prefill, preemption, prefix caching, n > 1, aborts, stop strings,
seeded sampling — all checked for exact outputs and for leaked KV blocks afterwards."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc import LLM, SamplingParams
from llmc.errors import ConfigError
from llmc.runtime.engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def rand_prompts(n: int, seed: int, lo: int = 1, hi: int = 90, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_all(engine: LLMEngine, prompts, params) -> list[list[int]]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    reqs = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished_requests():
        engine.step()
    return [r.final_output().outputs[0].token_ids for r in reqs]


def assert_all_free(engine: LLMEngine) -> None:
    assert engine.kv.num_used_blocks == 0, f"{engine.kv.num_used_blocks} KV blocks leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def tiny_engine_dir(tiny_factory):
    return tiny_factory("llama-gqa")[1]


def alone(engine_dir, prompts, params=GREEDY) -> list[list[int]]:
    eng = LLMEngine(engine_dir, show_progress=False, enable_prefix_caching=False)
    return [run_all(eng, [p], params)[0] for p in prompts]


def test_batch_of_32_equals_alone(tiny_engine_dir):
    prompts = rand_prompts(32, seed=0, hi=150)  # max_num_tokens is 64: long prompts prefill in chunks
    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    batched = run_all(eng, prompts, GREEDY)
    assert batched == alone(tiny_engine_dir, prompts)
    assert_all_free(eng)


def test_preemption_under_small_pool(tiny_engine_dir):
    prompts = rand_prompts(12, seed=1, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    big = LLMEngine(tiny_engine_dir, show_progress=False)
    want = run_all(big, prompts, params)
    small = LLMEngine(tiny_engine_dir, show_progress=False, num_kv_blocks=17)  # 272 tokens for ~1000 wanted
    got = run_all(small, prompts, params)
    assert small.metrics.num_preemptions > 0, "pool was not small enough to force preemption"
    assert got == want
    assert_all_free(small)


def test_guaranteed_no_evict_never_preempts(tiny_engine_dir):
    """The same tight pool as above: admitting only what can run to max_tokens preempts nothing, gives the
    same tokens, still runs several requests at once, and leaks nothing; n = 2 samples are reserved for too."""
    prompts = rand_prompts(12, seed=1, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = run_all(LLMEngine(tiny_engine_dir, show_progress=False), prompts, params)
    eng = LLMEngine(tiny_engine_dir, show_progress=False, num_kv_blocks=17, scheduler_policy="guaranteed_no_evict")
    peak = 0
    reqs = [eng.add_request(prompt_token_ids=p, params=params) for p in prompts]
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, eng.scheduler.num_running)
    assert [r.final_output().outputs[0].token_ids for r in reqs] == want
    assert eng.metrics.num_preemptions == 0 and peak >= 2
    assert_all_free(eng)
    pair = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=40, ignore_eos=True)
    reqs = [eng.add_request(prompt_token_ids=p, params=pair) for p in prompts[:6]]
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.metrics.num_preemptions == 0
    assert all(len(o.token_ids) == 40 for r in reqs for o in r.final_output().outputs)
    assert_all_free(eng)
    # A request whose n samples can never all fit is still admitted when nothing else runs (no deadlock).
    big = eng.add_request(prompt_token_ids=prompts[0], params=SamplingParams(n=4, temperature=0.8, seed=5,
                                                                             max_tokens=150, ignore_eos=True))
    for _ in range(3000):
        if not eng.has_unfinished_requests():
            break
        eng.step()
    assert [len(o.token_ids) for o in big.final_output().outputs] == [150] * 4
    assert_all_free(eng)
    with pytest.raises(ConfigError, match="scheduler-policy"):
        LLMEngine(tiny_engine_dir, show_progress=False, scheduler_policy="fifo")


def test_prefix_cache_computes_only_new_tokens(smol_engine):
    eng = LLMEngine(smol_engine, show_progress=False)
    tok = eng.tokenizer
    prefix = tok.encode("Here is a long shared system prompt about geography and history. " * 20)[:200]
    assert len(prefix) == 200
    a = prefix + tok.encode(" Question: what is the capital of Italy?")
    b = prefix + tok.encode(" Question: what is the capital of Spain?")
    params = SamplingParams(temperature=0, max_tokens=8)
    run_all(eng, [a], params)
    before = eng.metrics.computed_tokens
    reqs = [eng.add_request(prompt_token_ids=b, params=params)]
    while eng.has_unfinished_requests():
        eng.step()
    out = reqs[0].final_output()
    assert out.num_cached_tokens == 192  # 12 full blocks of 16
    generated_inputs = len(out.outputs[0].token_ids) - 1  # every sampled token but the last is fed back
    assert eng.metrics.computed_tokens - before == len(b) - 192 + generated_inputs
    fresh = LLMEngine(smol_engine, show_progress=False, enable_prefix_caching=False)
    assert run_all(fresh, [b], params)[0] == out.outputs[0].token_ids
    assert eng.kv.stats.prefix_hits >= 192
    assert_all_free(eng)


def test_n_samples_share_prompt_blocks(tiny_engine_dir):
    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    prompt = rand_prompts(1, seed=3, lo=40, hi=40)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    req = eng.add_request(prompt_token_ids=prompt, params=params)
    while eng.has_unfinished_requests():
        eng.step()
    out = req.final_output()
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = {tuple(c.token_ids) for c in out.outputs}
    assert len(seqs) == 3, "samples of one request must differ"
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert_all_free(eng)
    # Reproducible: the same seed gives the same three samples.
    req2 = eng.add_request(prompt_token_ids=prompt, params=params)
    while eng.has_unfinished_requests():
        eng.step()
    assert [c.token_ids for c in req2.final_output().outputs] == [c.token_ids for c in out.outputs]


def test_greedy_n2_samples_equal_each_other(tiny_engine_dir):
    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    prompt = rand_prompts(1, seed=4, lo=17, hi=17)[0]
    out = run_all(eng, [prompt], SamplingParams(n=1, temperature=0, max_tokens=12, ignore_eos=True))[0]
    req = eng.add_request(prompt_token_ids=prompt,
                          params=SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    outs = req.final_output().outputs
    assert outs[0].token_ids == outs[1].token_ids == out  # copy-on-write kept both caches correct
    assert_all_free(eng)


def test_seeded_sampling_independent_of_batch(tiny_engine_dir):
    target = rand_prompts(1, seed=5, lo=10, hi=10)[0]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    solo = run_all(eng, [target], params)[0]
    others = rand_prompts(6, seed=6)
    mixed = run_all(eng, others[:3] + [target] + others[3:],
                    [SamplingParams(temperature=1.0, max_tokens=16)] * 3 + [params]
                    + [SamplingParams(temperature=1.0, max_tokens=16)] * 3)[3]
    assert mixed == solo


def test_abort_frees_blocks(tiny_engine_dir):
    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    reqs = [eng.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=50, ignore_eos=True))
            for p in rand_prompts(6, seed=8)]
    for _ in range(5):
        eng.step()
    for r in reqs[::2]:
        assert eng.abort_request(r.request_id)
    assert not eng.abort_request(reqs[0].request_id)  # twice is harmless
    while eng.has_unfinished_requests():
        eng.step()
    assert_all_free(eng)
    assert all(len(r.final_output().outputs[0].token_ids) == 50 for r in reqs[1::2])


def test_stop_strings_never_leak(smol_engine):
    llm = LLM(smol_engine, show_progress=False)
    base = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    text = base[0].outputs[0].text
    assert " 8" in text, text
    stop = " 8"
    out = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert stop not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    # Streaming view: concatenated deltas equal the final text and never contain the stop string.
    eng = llm.engine
    eng.add_request("Count: 1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    pieces = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            pieces += [c.text for c in o.outputs]
    assert "".join(pieces) == out.text


def test_max_tokens_and_eos(smol_engine):
    llm = LLM(smol_engine, show_progress=False)
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                   use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < 200  # ended at <|im_end|>
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5


def test_logprobs(tiny_engine_dir):
    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    prompt = rand_prompts(1, seed=9, lo=12, hi=12)[0]
    req = eng.add_request(prompt_token_ids=prompt, params=SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                                          ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    c = req.final_output().outputs[0]
    assert len(c.logprobs) == 4
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_id == tok and lp.top[0][0] == tok  # greedy: chosen is the best
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob == pytest.approx(lp.top[0][1])
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))


def test_request_validation(tiny_engine_dir):
    from llmc.errors import RequestError

    eng = LLMEngine(tiny_engine_dir, show_progress=False)
    with pytest.raises(RequestError, match="max_seq_len"):
        eng.add_request(prompt_token_ids=[5] * 250, params=SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request(prompt_token_ids=[5, 99999], params=SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        eng.add_request(prompt_token_ids=[], params=SamplingParams())
    assert_all_free(eng)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "add", "step", "step", "abort"]),
                              st.integers(0, 10_000)), min_size=5, max_size=40))
def test_random_arrivals_and_aborts_property(tiny_engine_dir, ops):
    """Random arrivals, aborts and steps under a small pool: every live request finishes with the same
    tokens as when run alone, and no block leaks."""
    eng = LLMEngine(tiny_engine_dir, show_progress=False, num_kv_blocks=20)
    reqs, aborted = [], set()
    for op, x in ops:
        if op == "add":
            rng = random.Random(x)
            prompt = [rng.randrange(3, 384) for _ in range(rng.randint(1, 70))]
            n = 1 + x % 2
            reqs.append((eng.add_request(prompt_token_ids=prompt, params=SamplingParams(
                n=n, temperature=0, max_tokens=1 + x % 9, ignore_eos=True)), prompt))
        elif op == "abort" and reqs:
            r = reqs[x % len(reqs)][0]
            eng.abort_request(r.request_id)
            aborted.add(r.request_id)
        else:
            eng.step()
        live = [st.seq for r in eng.requests.values() for st in r.states if not st.seq.is_finished]
        eng.kv.check_invariants(live)
    while eng.has_unfinished_requests():
        eng.step()
    assert_all_free(eng)
    for r, prompt in reqs:
        if r.request_id in aborted:
            continue
        out = r.final_output()
        for c in out.outputs:
            assert len(c.token_ids) == r.params.max_tokens
        assert out.outputs[0].token_ids == run_all(eng, [prompt], SamplingParams(
            temperature=0, max_tokens=r.params.max_tokens, ignore_eos=True))[0]


def test_folding_norms_into_projections_keeps_logits(tiny_engine_dir):
    """The CUDA runner folds each RMSNorm weight into its 16-bit projection (W' = W diag(g)) so the norm can
    run inside the batch-1 GEMV; in fp32 that must leave logits unchanged, with norm weights far from 1."""
    from llmc.runtime.model_runner import ScheduledSeq
    from llmc.runtime.sequence import Sequence

    eng = LLMEngine(tiny_engine_dir, show_progress=False, enable_prefix_caching=False)
    model = eng.runner.model
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.copy_(0.25 + 2 * torch.rand(norm.weight.shape, generator=gen))

    def logits(ids):
        seq = Sequence("x", ids, SamplingParams())
        assert eng.kv.allocate_slots(seq, len(ids))
        out = eng.runner.forward([ScheduledSeq(seq, len(ids), True)], logit_rows=list(range(len(ids)))).clone()
        eng.kv.free(seq)
        return out

    ids = rand_prompts(1, seed=7, lo=20, hi=20)[0]
    before = logits(ids)
    assert model.fold_norms() == 2 * len(model.layers)
    assert model.fold_norms() == 0  # idempotent: a second fold would square g
    assert all(float(layer.input_layernorm.weight.sub(1).abs().max()) == 0 for layer in model.layers)
    torch.testing.assert_close(logits(ids), before, rtol=1e-4, atol=1e-4)
    assert eng.kv.num_used_blocks == 0
