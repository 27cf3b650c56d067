"""Perplexity of an engine over a text in strided windows, and greedy top-1 agreement between two engines:
what quantization costs, measured the way HF's perplexity guide does it (each token scored once, with up
to ``window - stride`` tokens of context carried over)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from llmc.build.engine import load_engine
from llmc.errors import ConfigError
from llmc.runtime.model_runner import ModelRunner, ScheduledSeq
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence


def _runner(engine_dir, window: int) -> ModelRunner:
    eng = load_engine(engine_dir)
    if window > eng.build.max_seq_len:
        raise ConfigError(f"--window {window} exceeds the engine's max_seq_len {eng.build.max_seq_len}")
    return ModelRunner(eng, "cpu", None, num_kv_blocks=-(-eng.build.max_seq_len // eng.build.block_size),
                       show_progress=False)


def _windows(n_tokens: int, window: int, stride: int):
    """(start, end, first scored position) of each window; every token after the first is scored once."""
    prev_end = 0
    for start in range(0, n_tokens - 1, stride):
        end = min(start + window, n_tokens)
        yield start, end, max(prev_end, start + 1)
        prev_end = end
        if end == n_tokens:
            break


def window_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    seq = Sequence("ppl", ids, SamplingParams())
    seq.block_table = list(range(-(-len(ids) // runner.block_size)))
    return runner.forward([ScheduledSeq(seq, len(ids), True)], logit_rows=list(range(len(ids))))


def perplexity(engine_dir, token_ids: list[int], window: int = 512, stride: int = 256,
               reference_engine=None) -> dict:
    """{'ppl', 'tokens'} and, with ``reference_engine``, 'top1_agreement': how often both engines' greedy
    next-token predictions agree over the same scored positions."""
    if stride <= 0 or stride > window:
        raise ConfigError("--stride must be in 1..window")
    runner = _runner(engine_dir, window)
    ref = _runner(reference_engine, window) if reference_engine else None
    nll, count, agree = 0.0, 0, 0
    spans = list(_windows(len(token_ids), window, stride))
    for start, end, first in tqdm(spans, desc="perplexity", unit="window"):
        ids = token_ids[start:end]
        logits = window_logits(runner, ids)
        rows = torch.arange(first - start - 1, end - start - 1)
        targets = torch.tensor(ids)[rows + 1]
        logp = torch.log_softmax(logits[rows].float(), dim=-1)
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(rows)
        if ref is not None:
            agree += (window_logits(ref, ids)[rows].argmax(-1) == logits[rows].argmax(-1)).sum().item()
    out = {"ppl": math.exp(nll / count), "tokens": count, "window": window, "stride": stride}
    if ref is not None:
        out["top1_agreement"] = agree / count
    return out
