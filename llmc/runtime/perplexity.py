"""Perplexity of an engine over a text in strided windows, and greedy top-1 agreement between two engines:
what quantization costs, measured the way HF's perplexity guide does it (each token scored once, with up
to ``window - stride`` tokens of context carried over). The model runner is driven directly (teacher
forcing, no sampler): both engines see exactly the same contexts, so agreement compares like with like.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from llmc.build.engine import load_engine
from llmc.errors import ConfigError
from llmc.runtime.model_runner import ModelRunner, ScheduledSeq
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence


def _runner(engine_dir, window: int, device: str) -> ModelRunner:
    eng = load_engine(engine_dir)
    if window > eng.build.max_seq_len:
        raise ConfigError(f"--window {window} exceeds the engine's max_seq_len {eng.build.max_seq_len}; "
                          "lower --window or rebuild with a larger --max-seq-len")
    return ModelRunner(eng, device, None, num_kv_blocks=-(-eng.build.max_seq_len // eng.build.block_size),
                       show_progress=False, cuda_graph_batch_sizes=[])


def encode(engine_dir, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` with the engine's own tokenizer."""
    from transformers import AutoTokenizer

    eng = load_engine(engine_dir)
    if eng.tokenizer_dir is None:
        raise ConfigError(f"{engine_dir}: this engine has no tokenizer; pass token ids instead of text")
    return AutoTokenizer.from_pretrained(str(eng.tokenizer_dir)).encode(text)[:max_tokens]


def _ids(engine_dir, text, max_tokens) -> list[int]:
    ids = encode(engine_dir, text, max_tokens) if isinstance(text, str) else list(text)[:max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    return ids


def windows(n_tokens: int, window: int, stride: int):
    """(start, end, first scored position) of each window; every token after the first is scored once."""
    if stride <= 0 or stride > window:
        raise ConfigError(f"--stride must be in 1..window ({window}), got {stride}")
    prev_end = 0
    for start in range(0, n_tokens - 1, stride):
        end = min(start + window, n_tokens)
        yield start, end, max(prev_end, start + 1)
        prev_end = end
        if end == n_tokens:
            break


def window_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Float32 logits for every position of ``ids``, one prefill through the paged path."""
    seq = Sequence("ppl", ids, SamplingParams())
    seq.block_table = list(range(-(-len(ids) // runner.block_size)))
    return runner.forward([ScheduledSeq(seq, len(ids), True)], logit_rows=list(range(len(ids))))


def evaluate(engine_dir, text: str | list[int], window: int = 512, stride: int = 256,
             max_tokens: int | None = None, device: str = "cpu", desc: str = "perplexity") -> dict:
    """{'ppl', 'nll', 'tokens', 'window', 'stride', 'predictions'}: ``predictions`` is the greedy next token
    at every scored position (what ``top1_agreement`` compares)."""
    ids = _ids(engine_dir, text, max_tokens)
    runner = _runner(engine_dir, window, device)
    nll, count, preds = 0.0, 0, []
    spans = list(windows(len(ids), window, stride))
    for start, end, first in tqdm(spans, desc=desc, unit="window"):
        chunk = ids[start:end]
        logits = window_logits(runner, chunk).cpu()
        rows = torch.arange(first - start - 1, end - start - 1)
        targets = torch.tensor(chunk)[rows + 1]
        logp = torch.log_softmax(logits[rows].double(), dim=-1)
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(rows)
        preds += logits[rows].argmax(-1).tolist()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "window": window,
            "stride": stride, "predictions": preds}


def perplexity(engine_dir, text: str | list[int], window: int = 512, stride: int = 256,
               reference_engine=None, max_tokens: int | None = None, device: str = "cpu") -> dict:
    """Perplexity of ``engine_dir`` over ``text`` (a string, encoded with the engine's tokenizer, or token
    ids): {'ppl', 'nll', 'tokens', 'window', 'stride'}, plus 'top1_agreement' with ``reference_engine``."""
    res = evaluate(engine_dir, text, window, stride, max_tokens, device)
    preds = res.pop("predictions")
    if reference_engine is not None:
        ids = _ids(engine_dir, text, max_tokens)
        ref = evaluate(reference_engine, ids, window, stride, None, device, desc="reference")["predictions"]
        res["top1_agreement"] = agreement(preds, ref)
    return res


def agreement(a: list[int], b: list[int]) -> float:
    if len(a) != len(b) or not a:
        raise ConfigError("predictions over different positions cannot be compared")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def top1_agreement(engine_a, engine_b, text: str | list[int], window: int = 512, stride: int = 256,
                   max_tokens: int | None = None, device: str = "cpu") -> dict:
    """How often two engines' greedy next-token predictions agree over the same scored positions of
    ``text`` (teacher-forced: both see the true text as context). Text is encoded with ``engine_a``'s
    tokenizer; the engines must share a vocabulary."""
    ids = _ids(engine_a, text, max_tokens)
    a = evaluate(engine_a, ids, window, stride, None, device, desc="engine A")
    b = evaluate(engine_b, ids, window, stride, None, device, desc="engine B")
    return {"top1_agreement": agreement(a["predictions"], b["predictions"]), "positions": a["tokens"],
            "ppl_a": a["ppl"], "ppl_b": b["ppl"], "window": window, "stride": stride,
            "engine_a": str(Path(engine_a)), "engine_b": str(Path(engine_b))}
