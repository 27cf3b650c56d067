"""Pipelined steps (async scheduling): step N is scheduled and launched before step N-1's tokens are read
back. Whatever the mix of requests, the outputs must be exactly those of synchronous steps, no KV block may
leak, and the block manager's invariants must hold after every step."""
from __future__ import annotations

import random

import pytest

from llmc import SamplingParams
from llmc.runtime.engine import LLMEngine
from tests.test_runtime import assert_all_free, rand_prompts


@pytest.fixture(scope="module")
def tiny_engine_dir(tiny_factory):
    return tiny_factory("llama-gqa")[1]


def mixed_params(n: int, seed: int, stop_tokens: list[int]) -> list[SamplingParams]:
    """Greedy and seeded sampling, stop tokens, EOS, min_tokens, logprobs, n = 2, lengths 1..40."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 6
        m = rng.randint(1, 40)
        if kind == 0:
            out.append(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        elif kind == 1:
            out.append(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=rng.randrange(1000), max_tokens=m))
        elif kind == 2:
            out.append(SamplingParams(temperature=0, max_tokens=m, stop_token_ids=stop_tokens))
        elif kind == 3:
            out.append(SamplingParams(temperature=1.0, seed=i, max_tokens=m, min_tokens=min(m, 6),
                                      stop_token_ids=stop_tokens))
        elif kind == 4:
            out.append(SamplingParams(temperature=0, max_tokens=m, logprobs=3, ignore_eos=True))
        else:
            out.append(SamplingParams(n=2, temperature=0.7, seed=i, max_tokens=m, min_p=0.05))
    return out


def run(engine: LLMEngine, prompts, params, abort_at: dict[int, list[int]] | None = None):
    """Step to the end, checking invariants each step; ``abort_at`` = {step: [request indices]}."""
    reqs = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts, params)]
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        for i in (abort_at or {}).get(step, []):
            engine.abort_request(reqs[i].request_id)
        live = engine.scheduler.running + engine.scheduler.waiting
        engine.kv.check_invariants(live)
    return [r.final_output() for r in reqs]


def comparable(outs) -> list:
    """Tokens, finish and stop reasons of every sample; logprobs separately (see ``logprobs_of``)."""
    return [[(c.index, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def logprobs_of(outs) -> list[float]:
    return [v for o in outs for c in o.outputs for lp in c.logprobs or []
            for v in [lp.logprob] + [t for _, t in lp.top]]


def assert_same(got, want, lp_tol: float) -> None:
    assert comparable(got) == comparable(want)
    a, b = logprobs_of(got), logprobs_of(want)
    assert len(a) == len(b) and len(a) > 0
    assert max(abs(x - y) for x, y in zip(a, b)) <= lp_tol


def stop_tokens_of(engine_dir, prompts) -> list[int]:
    """Two tokens the greedy continuations do produce, so stop_token_ids really cut some requests short."""
    eng = LLMEngine(engine_dir, show_progress=False, async_scheduling=False)
    outs = run(eng, prompts[:4], [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 4)
    toks = [t for o in outs for t in o.outputs[0].token_ids[3:]]
    return sorted(set(toks), key=toks.count)[-2:]


def test_pipelined_equals_synchronous(tiny_engine_dir):
    prompts = rand_prompts(30, seed=5, hi=120)  # more requests than max_batch_size 16, chunked prefills
    stop = stop_tokens_of(tiny_engine_dir, prompts)
    params = mixed_params(len(prompts), seed=5, stop_tokens=stop)
    sync = LLMEngine(tiny_engine_dir, show_progress=False, async_scheduling=False)
    want = run(sync, prompts, params)
    pipe = LLMEngine(tiny_engine_dir, show_progress=False, async_scheduling=True)
    got = run(pipe, prompts, params)
    # fp32 on the CPU; bf16 on the GPU, where the extra rows of the run-ahead steps change the GEMMs' shapes
    # and so their bf16 rounding (same tokens, logprobs within bf16's step at logit magnitudes)
    assert_same(got, want, 1e-5 if sync.runner.device.type == "cpu" else 0.1)
    assert any(c.finish_reason == "stop" for o in want for c in o.outputs), "no request stopped early"
    assert_all_free(pipe)
    # The pipeline ran ahead: sequences that stopped computed one thrown-away token each.
    assert pipe.metrics.computed_tokens > sync.metrics.computed_tokens


def test_pipelined_outputs_lag_one_step(tiny_engine_dir):
    eng = LLMEngine(tiny_engine_dir, show_progress=False, async_scheduling=True)
    eng.add_request(prompt_token_ids=[5, 6, 7, 8, 9], params=SamplingParams(temperature=0, max_tokens=3))
    assert eng.step() == []  # the prefill and its first sample are launched, not read back yet
    assert eng._inflight is not None
    first = eng.step()  # launches the second decode, reads the first token back
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    while eng.has_unfinished_requests():
        eng.step()
    assert_all_free(eng)
    # No token is computed past max_tokens: 5 prompt tokens, then the inputs of tokens 2 and 3.
    assert eng.metrics.computed_tokens == 5 + 2


def test_pipelined_preemption_and_aborts(tiny_engine_dir):
    prompts = rand_prompts(14, seed=9, lo=20, hi=60)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * len(prompts)
    want = run(LLMEngine(tiny_engine_dir, show_progress=False, async_scheduling=False), prompts, params)
    small = LLMEngine(tiny_engine_dir, show_progress=False, num_kv_blocks=17, async_scheduling=True)
    aborted = {3: [0], 7: [5, 6], 20: [13]}
    got = run(small, prompts, params, abort_at=aborted)
    assert small.metrics.num_preemptions > 0, "pool was not small enough to force preemption"
    gone = {i for v in aborted.values() for i in v}
    for i, (g, w) in enumerate(zip(got, want)):
        if i in gone:
            assert g.outputs[0].finish_reason in ("abort", "length")
            assert g.outputs[0].token_ids == w.outputs[0].token_ids[:len(g.outputs[0].token_ids)]
        else:
            assert g.outputs[0].token_ids == w.outputs[0].token_ids, i
    assert_all_free(small)


def test_penalty_request_drains_the_pipeline(tiny_engine_dir):
    """A request with penalties needs its previous token on the host: the engine drains and runs synchronous
    steps while it lives, then pipelines again; outputs stay exact either way."""
    prompts = rand_prompts(6, seed=2, hi=30)
    params = [SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)] * 5 + [
        SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5,
                       ignore_eos=True)]
    want = run(LLMEngine(tiny_engine_dir, show_progress=False, async_scheduling=False), prompts, params)
    eng = LLMEngine(tiny_engine_dir, show_progress=False, async_scheduling=True)
    reqs = [eng.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts[:5], params[:5])]
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    reqs.append(eng.add_request(prompt_token_ids=prompts[5], params=params[5]))
    eng.step()  # drains
    assert eng._inflight is None
    while eng.has_unfinished_requests():
        eng.step()
    assert eng._sync_requests == 0
    assert comparable([r.final_output() for r in reqs]) == comparable(want)
    assert_all_free(eng)


def test_pipelined_stop_strings_and_text(smol_engine):
    """The real model with its tokenizer: EOS, stop strings held back and detokenized text all as in
    synchronous steps."""
    prompts = ["The capital of France is", "List three colors:", "1, 2, 3, 4,", "Once upon a time"]
    params = [SamplingParams(temperature=0, max_tokens=24),
              SamplingParams(temperature=0, max_tokens=24, stop=["\n", "."]),
              SamplingParams(temperature=0, max_tokens=24, stop=[" 7"]),
              SamplingParams(temperature=0.9, seed=3, max_tokens=24, stop=[","])]

    def texts(async_scheduling: bool):
        eng = LLMEngine(smol_engine, show_progress=False, async_scheduling=async_scheduling)
        reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        while eng.has_unfinished_requests():
            eng.step()
        assert_all_free(eng)
        return [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
                for o in (r.final_output() for r in reqs)]

    want = texts(False)
    assert sum(f == "stop" for _, _, f in want) >= 2
    assert texts(True) == want


@pytest.mark.gpu
def test_pipelined_on_gpu_equals_synchronous(tiny_engine_dir):
    """On the GPU the pipeline really overlaps (tokens fed on the device, pinned copies, events), with CUDA
    graphs for the decodes: float32 outputs equal synchronous steps, and greedy ones equal the CPU."""
    prompts = rand_prompts(30, seed=7, hi=120)
    stop = stop_tokens_of(tiny_engine_dir, prompts)
    params = mixed_params(len(prompts), seed=7, stop_tokens=stop)
    want = run(LLMEngine(tiny_engine_dir, device="cuda", dtype="float32", show_progress=False,
                         async_scheduling=False), prompts, params)
    pipe = LLMEngine(tiny_engine_dir, device="cuda", dtype="float32", show_progress=False)
    assert pipe.async_scheduling and pipe.runner.graphs is not None
    got = run(pipe, prompts, params)
    assert_same(got, want, 1e-3)
    assert_all_free(pipe)
    cpu = run(LLMEngine(tiny_engine_dir, device="cpu", show_progress=False), prompts, params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    assert [got[i].outputs[0].token_ids for i in greedy] == [cpu[i].outputs[0].token_ids for i in greedy]
