"""Batched, vectorized sampling on whatever device the logits are on.

Order per row: penalties (repetition on prompt+output tokens, presence/frequency on output counts) and
banned tokens -> temperature -> top-k -> top-p -> min-p -> draw. Greedy rows (temperature 0) take the argmax
of the penalized logits. The draw uses the exponential race (argmax of p / E with E ~ Exp(1)), which is
exact categorical sampling without a cumulative sum; a seeded row draws its noise from its own generator,
seeded from (seed, sample index, tokens generated so far), so its tokens do not depend on the rest of the
batch nor on preemption. Reported logprobs are log_softmax of the penalized logits before temperature and
filtering (the model's distribution, like vLLM's default "raw" mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmc.runtime.sampling_params import SamplingParams


def seeded_generator(seed: int, offset: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, offset)) & ((1 << 63) - 1))
    return g


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32 (0 = greedy)
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    prompt_mask: torch.Tensor | None  # [B, V] bool, only when some row has penalties
    output_counts: torch.Tensor | None  # [B, V] int32
    generators: list[torch.Generator | None]
    all_greedy: bool
    all_random: bool
    max_num_logprobs: int | None
    banned_token_ids: list[list[int]] | None = None
    # Known on the host from the params, so the sampler never asks the GPU (each ask is a full sync):
    need_sort: bool = True  # some row has top-k or top-p
    need_min_p: bool = True

    @classmethod
    def from_params(cls, params: list[SamplingParams], token_ids: list[list[int]], output_ids: list[list[int]],
                    vocab_size: int, device: torch.device | str, seeds_offsets: list[int]) -> "SamplingBatch":
        """Every per-row column in one host->device copy that does not wait for the GPU."""
        from llmc.plugins.metadata import upload

        device = torch.device(device)
        B = len(params)
        cols = upload([[p.temperature for p in params], [float(p.top_k) for p in params],
                       [p.top_p for p in params], [p.min_p for p in params],
                       [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                       [p.frequency_penalty for p in params]], device, torch.float32)
        prompt_mask = output_counts = None
        if any(p.has_penalties for p in params):
            seen: list[int] = []  # flat indices row * V + token
            outs: list[int] = []
            for i, (p, prompt, out) in enumerate(zip(params, token_ids, output_ids)):
                if p.has_penalties:
                    seen += [i * vocab_size + t for t in prompt]
                    outs += [i * vocab_size + t for t in out]
            seen_t, outs_t = upload([seen, outs], device)
            prompt_mask = torch.zeros(B * vocab_size, dtype=torch.bool, device=device)
            prompt_mask[seen_t] = True
            output_counts = torch.zeros(B * vocab_size, dtype=torch.int32, device=device)
            output_counts.index_add_(0, outs_t, torch.ones(len(outs), dtype=torch.int32, device=device))
            prompt_mask, output_counts = prompt_mask.view(B, vocab_size), output_counts.view(B, vocab_size)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=cols[0], top_k=cols[1].long(), top_p=cols[2], min_p=cols[3], repetition_penalty=cols[4],
            presence_penalty=cols[5], frequency_penalty=cols[6],
            prompt_mask=prompt_mask, output_counts=output_counts,
            generators=[seeded_generator(p.seed, off, device) if p.seed is not None and not p.greedy else None
                        for p, off in zip(params, seeds_offsets)],
            all_greedy=all(p.greedy for p in params), all_random=not any(p.greedy for p in params),
            max_num_logprobs=max(logprobs) if logprobs else None,
            need_sort=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
            need_min_p=any(p.min_p > 0 for p in params if not p.greedy))


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] logprob of the chosen token
    top_logprobs: torch.Tensor | None  # [B, N], best first
    top_token_ids: torch.Tensor | None  # [B, N]


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Repetition (HF/vLLM: divide positive, multiply negative logits of seen tokens), then OpenAI
    presence/frequency on output counts. Returns float32 logits, a new tensor when anything applies; callers
    only read it, so plain batches skip a [rows, vocab] copy (0.5 GB at 1,024 rows of a 128k vocabulary)."""
    logits = logits.float()
    if b.output_counts is None and not b.banned_token_ids:
        return logits
    logits = logits.clone()
    if b.output_counts is not None:
        seen = b.prompt_mask | (b.output_counts > 0)
        rp = b.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalized, logits)
        counts = b.output_counts.float()
        logits -= b.frequency_penalty[:, None] * counts + b.presence_penalty[:, None] * (counts > 0).float()
    if b.banned_token_ids:
        from llmc.plugins.metadata import upload

        rows = [i for i, ids in enumerate(b.banned_token_ids) for _ in ids]
        cols = [t for ids in b.banned_token_ids for t in ids]
        if rows:
            rows_t, cols_t = upload([rows, cols], logits.device)
            logits[rows_t, cols_t] = float("-inf")
    return logits


def filtered_probs(logits: torch.Tensor, b: SamplingBatch, normalize: bool = True) -> torch.Tensor:
    """Sampling distribution of every row after temperature, top-k, top-p and min-p (one sort per batch).
    ``normalize=False`` leaves each row's scale (min-p may have dropped mass): enough for the sampler's
    argmax of p / E, which no per-row factor changes."""
    temp = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    V = probs.shape[-1]
    if b.need_sort:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=probs.device)[None, :]
        k = torch.where(b.top_k > 0, b.top_k, torch.full_like(b.top_k, V))
        sorted_p = sorted_p.masked_fill(rank >= k[:, None], 0.0)
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill((before >= b.top_p[:, None]) & (rank > 0), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    if b.need_min_p:
        thresh = probs.max(-1, keepdim=True).values * b.min_p[:, None]
        probs = probs.masked_fill(probs < thresh, 0.0)
    return probs / probs.sum(-1, keepdim=True) if normalize else probs


def probs_for(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """The exact distribution each row samples from (one-hot argmax for greedy rows): for speculative
    decoding's rejection sampling."""
    logits = apply_penalties(logits, b)
    probs = filtered_probs(logits, b)
    if not b.all_random:  # some rows are greedy
        greedy = b.temperature == 0
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    q = torch.empty(shape, device=device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q


class Sampler:
    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        logits = apply_penalties(logits, b)
        if b.all_greedy:
            tokens = logits.argmax(-1)
        else:
            probs = filtered_probs(logits, b, normalize=False)
            sampled = (probs / exponential_noise(tuple(probs.shape), b.generators, probs.device)).argmax(-1)
            tokens = sampled if b.all_random else torch.where(b.temperature == 0, logits.argmax(-1), sampled)
        if b.max_num_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        top_lp = top_ids = None
        if b.max_num_logprobs > 0:
            top_lp, top_ids = logprobs.topk(b.max_num_logprobs, dim=-1)
        return SamplerOutput(tokens, chosen, top_lp, top_ids)
