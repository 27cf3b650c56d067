"""Foundation: llmc's model matches Hugging Face transformers on the real SmolLM2 GGUF and on tiny random
models of each supported architecture (logits and greedy tokens), through convert -> build -> run."""
from __future__ import annotations

import pytest
import torch

from llmc import LLM, SamplingParams
from llmc.build.engine import load_engine
from llmc.runtime.model_runner import ModelRunner, ScheduledSeq
from llmc.runtime.sequence import Sequence

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
]


def runner_logits(engine_dir, token_ids: list[int], chunk: int | None = None):
    """All-position logits through the paged path; with ``chunk`` the prompt is prefilled in pieces."""
    return runner_logits_on(engine_dir, token_ids, "cpu", None, chunk)


def runner_logits_on(engine_dir, token_ids: list[int], device: str, dtype: str | None, chunk: int | None = None):
    eng = load_engine(engine_dir)
    r = ModelRunner(eng, device=device, dtype=dtype, show_progress=False, cuda_graph_batch_sizes=[],
                    num_kv_blocks=max(64, eng.build.max_seq_len // eng.build.block_size + 4))
    seq = Sequence("t", token_ids, SamplingParams())
    nblocks = -(-len(token_ids) // eng.build.block_size)
    seq.block_table = list(range(nblocks, 0, -1))  # scrambled block order: tables must be honoured
    chunk = chunk or len(token_ids)
    outs = []
    while seq.num_computed_tokens < len(token_ids):
        n = min(chunk, len(token_ids) - seq.num_computed_tokens)
        outs.append(r.forward([ScheduledSeq(seq, n, True)], logit_rows=list(range(n))))
        seq.num_computed_tokens += n
    return torch.cat(outs)


def hf_greedy(model, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, top_p=None, top_k=None,
                             temperature=None)
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for i, t in enumerate(new):
        if t in eos:
            return new[: i + 1]
    return new


@pytest.fixture(scope="module")
def smol_llm(smol_engine):
    return LLM(smol_engine, show_progress=False)


def test_smol_logits_match_hf(smol_engine, smol_hf, smol_llm):
    tok = smol_llm.get_tokenizer()
    for p in PROMPTS:
        ids = tok.encode(p)
        ours = runner_logits(smol_engine, ids)
        with torch.no_grad():
            ref = smol_hf(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)


def test_smol_chunked_prefill_logits_match(smol_engine, smol_hf, smol_llm):
    ids = smol_llm.get_tokenizer().encode(PROMPTS[2] * 3)
    ours = runner_logits(smol_engine, ids, chunk=7)
    with torch.no_grad():
        ref = smol_hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("chat", [False, True])
def test_smol_greedy_matches_hf(smol_llm, smol_hf, chat):
    tok = smol_llm.get_tokenizer()
    if chat:
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in PROMPTS]
    else:
        ids = [tok.encode(p) for p in PROMPTS]
    outs = smol_llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0, max_tokens=32),
                             use_tqdm=False)
    for i, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(smol_hf, i, 32)


def test_smol_generates_paris(smol_llm):
    out = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "llama3-rope", "qwen2-bias", "mistral"])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 50])
def test_tiny_logits_match_hf(tiny_factory, kind, length):
    import transformers

    hf_dir, engine = tiny_factory(kind)
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 384, (length,), generator=g).tolist()
    ours = runner_logits(engine, ids, chunk=max(1, length // 3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "llama3-rope", "qwen2-bias", "mistral"])
def test_tiny_greedy_matches_hf(tiny_factory, kind):
    import transformers

    hf_dir, engine = tiny_factory(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # random weights: run the full length on both sides
    llm = LLM(engine, show_progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 16, 33)]
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)
