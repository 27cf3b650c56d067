"""Speculative decoding figures: acceptance and speedup, as JSON.

    # n-gram on an edit/summarise workload (real model; CPU or GPU)
    python benchmarks/spec_decode.py ngram ENGINE [--k 4] [--max-tokens 128]
    # speedup at batch 1 as a function of acceptance rate: an oracle proposer replays the target's own greedy
    # continuation, each proposed token kept right with probability alpha (weights may be synthetic)
    python benchmarks/spec_decode.py oracle ENGINE [--alphas 0,0.5,0.8,1] [--k 4]
    # end to end with a draft engine
    python benchmarks/spec_decode.py draft ENGINE --draft DRAFT_ENGINE [--k 4]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmc.runtime.engine import LLMEngine  # noqa: E402
from llmc.runtime.sampling_params import SamplingParams  # noqa: E402
from llmc.spec.decoder import SpecConfig  # noqa: E402

# Short original passages for an edit workload: the answer copies most of its input, as editing does.
PASSAGES = [
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night its keeper climbed "
    "the narrow stairs, cleaned the great lens, and lit the lamp so that ships could find the harbour safely.",
    "Our team meets every Monday at nine to review the previous week. We discuss what went well, what went wrong, "
    "and which tasks should be finished before Friday. Notes from the meeting are shared with everyone.",
    "To make bread, mix flour, water, yeast and salt in a large bowl. Knead the dough for ten minutes, let it rise "
    "for an hour, shape it into a loaf, and bake it in a hot oven until the crust is golden brown.",
    "The river flows slowly through the valley, past small farms and quiet villages. In spring the water rises "
    "and floods the meadows, and in summer children swim in the deep pools below the stone bridge.",
]
INSTRUCTIONS = ["Repeat the following text exactly, but replace every full stop with an exclamation mark:\n\n",
                "Copy the following paragraph word for word:\n\n"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float, int]:
    reqs = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    sync()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    dt = time.perf_counter() - t
    outs = [r.final_output().outputs[0].token_ids for r in reqs]
    return outs, dt, sum(len(o) for o in outs)


def run_each(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float, int]:
    """Batch 1 (the regime speculation is for): each prompt alone; outputs, total seconds, total tokens."""
    outs, total_t, total_n = [], 0.0, 0
    for p in prompts:
        o, dt, n = run(engine, [p], params)
        outs += o
        total_t += dt
        total_n += n
    return outs, total_t, total_n


def ngram(a) -> dict:
    base = LLMEngine(a.engine, show_progress=False)
    tok = base.tokenizer
    prompts = [base.apply_chat_template([{"role": "user", "content": ins + p}])
               for ins in INSTRUCTIONS for p in PASSAGES]
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    run(base, prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    res = {"workload": "edit/copy prompts (chat template), greedy", "num_prompts": len(prompts), "batch": 1,
           "device": str(base.runner.device), "k": a.k}
    want, t_base, n_base = run_each(base, prompts, params)
    spec = LLMEngine(a.engine, show_progress=False,
                     speculative=SpecConfig(method="ngram", num_speculative_tokens=a.k))
    got, t_spec, n_spec = run_each(spec, prompts, params)
    res.update({"baseline_tok_per_s": n_base / t_base, "spec_tok_per_s": n_spec / t_spec,
                "speedup": (n_spec / t_spec) / (n_base / t_base), "identical_outputs": got == want,
                **{f"spec_{k}": v for k, v in spec.spec.stats.as_dict().items()},
                "example_output": tok.decode(got[0][:60]) if tok else None})
    return res


class OracleProposer:
    """Proposes the target's known greedy continuation, each token right with probability ``alpha``."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], alpha: float, vocab: int, seed: int = 0):
        self.reference, self.alpha, self.vocab = reference, alpha, vocab
        self.rng = random.Random(seed)

    def propose(self, seqs, ks):
        out = []
        for s, k in zip(seqs, ks):
            ref = self.reference[tuple(s.prompt_token_ids)]
            n = len(s.output_token_ids)
            toks = []
            for t in ref[n:n + k]:
                toks.append(t if self.rng.random() < self.alpha else (t + 1 + self.rng.randrange(self.vocab - 1))
                            % self.vocab)
            out.append(toks)
        return out, [None] * len(seqs)

    def rollback(self, seq, n) -> None:
        pass

    def release(self, seq) -> None:
        pass


def oracle(a) -> dict:
    from llmc.spec.decoder import SpecDecoder

    cfg = SpecConfig(method="ngram", num_speculative_tokens=a.k, adaptive=False)
    eng = LLMEngine(a.engine, show_progress=False, max_batch_size=1, gpu_memory_utilization=0.5,  # load once
                    dtype=a.dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, eng.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    run(eng, prompts[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    ref, t_base, n_base = {}, 0.0, 0
    for p in prompts:
        o, dt, n = run(eng, [p], params)
        ref[tuple(p)] = o[0]
        t_base += dt
        n_base += n
    base_ms = t_base / n_base * 1e3
    rows = []
    for alpha in [float(x) for x in a.alphas.split(",")]:
        eng.spec = SpecDecoder(cfg, eng)
        eng.spec.proposer = OracleProposer(ref, alpha, eng.vocab_size)
        t, n, same = 0.0, 0, True
        for p in prompts:
            o, dt, k = run(eng, [p], params)
            same &= o[0] == ref[tuple(p)]
            t += dt
            n += k
        st = eng.spec.stats
        rows.append({"alpha": alpha, "acceptance_rate": st.acceptance_rate, "mean_accepted_length":
                     st.mean_accepted_length, "ms_per_token": t / n * 1e3, "speedup": base_ms / (t / n * 1e3),
                     "identical_outputs": same})
    return {"mode": "oracle", "batch": 1, "k": a.k, "baseline_ms_per_token": base_ms, "rows": rows,
            "device": str(eng.runner.device), "weights": "as in the engine (synthetic for the 7B figures)"}


def draft(a) -> dict:
    # One engine (weights and CUDA graphs load once); the baseline runs with its speculation switched off.
    eng = LLMEngine(a.engine, show_progress=False, max_batch_size=1, gpu_memory_utilization=0.5,
                    speculative=SpecConfig(method="draft", draft_engine=a.draft, num_speculative_tokens=a.k))
    spec, eng.spec = eng.spec, None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, eng.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    run(eng, prompts[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    want, t_base, n_base = run_each(eng, prompts, params)
    eng.spec = spec
    got, t, n = run_each(eng, prompts, params)
    return {"mode": "draft", "k": a.k, "baseline_ms_per_token": t_base / n_base * 1e3, "ms_per_token": t / n * 1e3,
            "speedup": (t_base / n_base) / (t / n), "identical_outputs": got == want, **spec.stats.as_dict()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ngram", "oracle", "draft"])
    ap.add_argument("engine")
    ap.add_argument("--draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--alphas", default="0,0.5,0.7,0.8,0.9,1")
    ap.add_argument("--dtype", default=None, help="compute dtype (oracle mode); random weights make bf16 greedy "
                    "decoding flip between kernel shapes, so the oracle sweep runs in float32 there")
    a = ap.parse_args()
    print(json.dumps({"ngram": ngram, "oracle": oracle, "draft": draft}[a.mode](a), indent=1))
