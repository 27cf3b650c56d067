"""Speculative decoding inside in-flight batching.

Before each step the proposer guesses up to k tokens for every running decode; the scheduler gives such a
sequence 1 + k query tokens in the same flat batch as everyone else; the engine verifies them exactly
(``verify.py``) and rolls back the K/V of rejected tokens (block tables and lengths, target and draft).

When it turns itself off: for requests with penalties, logprobs or pending min_tokens (their per-token
processing is sequential by nature), when more sequences are decoding than ``max_batch_size`` (a big
batch is compute-bound: extra query tokens are no longer free), and per request when its running
acceptance rate says speculation does not pay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmc.errors import ConfigError
from llmc.runtime.sampler import SamplingBatch, probs_for, seeded_generator
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence
from llmc.spec.ngram import propose_ngram
from llmc.spec.verify import verify


@dataclass
class SpecConfig:
    method: str = "ngram"  # "ngram" | "draft"
    num_speculative_tokens: int = 4
    draft_engine: str | None = None
    max_batch_size: int = 32  # no speculation while more sequences than this are decoding
    ngram_max: int = 4
    ngram_min: int = 1
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ConfigError(f"--speculative must be 'ngram' or 'draft', got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError("--num-speculative-tokens must be in 1..16")
        if self.method == "draft" and not self.draft_engine:
            raise ConfigError("--speculative draft needs --draft-engine DIR (an engine with the same tokenizer)")


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0  # sequence-steps that verified a proposal
    emitted: int = 0  # tokens emitted by those sequence-steps (accepted + 1 each)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length, "verify_steps": self.verify_steps}


@dataclass
class _SeqSpec:
    """Per-sequence adaptive state: an exponential moving average of its acceptance rate."""

    rate: float = 0.7
    cooldown: int = 0
    stats: SpecStats = field(default_factory=SpecStats)
    draft_probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to ``ks[i]`` tokens for each sequence, and the proposer's distribution over them
        (``[len, V]``, or None for a point-mass proposer)."""

    def rollback(self, seq: Sequence, num_valid_tokens: int) -> None:
        """The first ``num_valid_tokens`` of ``seq.token_ids`` are final; forget anything past them."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was aborted/preempted."""


class NgramProposer:
    def __init__(self, cfg: SpecConfig):
        self.cfg = cfg

    def propose(self, seqs, ks):
        return [propose_ngram(s.token_ids, k, self.cfg.ngram_max, self.cfg.ngram_min) for s, k in zip(seqs, ks)], \
            [None] * len(seqs)

    def rollback(self, seq, num_valid_tokens) -> None:
        pass

    def release(self, seq) -> None:
        pass


def speculation_allowed(p: SamplingParams, seq: Sequence) -> bool:
    return (not p.has_penalties and p.logprobs is None and seq.num_output_tokens >= p.min_tokens
            and p.num_speculative_tokens != 0)


class SpecDecoder:
    def __init__(self, cfg: SpecConfig, engine):
        self.cfg = cfg
        self.engine = engine
        self.stats = SpecStats()
        self.state: dict[int, _SeqSpec] = {}
        if cfg.method == "ngram":
            self.proposer: Proposer = NgramProposer(cfg)
        else:
            from llmc.spec.draft import DraftProposer

            self.proposer = DraftProposer(cfg, engine)

    def _k_for(self, seq: Sequence) -> int:
        st = self.state.setdefault(seq.seq_id, _SeqSpec())
        k = seq.params.num_speculative_tokens or self.cfg.num_speculative_tokens
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.engine.max_seq_len - seq.num_tokens) - 1
        k = min(k, max(room, 0))
        if not self.cfg.adaptive or seq.params.num_speculative_tokens:
            return k
        if st.cooldown > 0:  # recently useless for this request: try again later
            st.cooldown -= 1
            return 0
        if st.rate < 0.15:
            st.cooldown, st.rate = 16, 0.3
            return 0
        return k if st.rate >= 0.5 else max(1, k // 2)

    def propose(self, running: list[Sequence]) -> None:
        """Attach proposals to running decodes (``seq.spec_token_ids``)."""
        decoding = [s for s in running if not s.in_prefill and s.num_computed_tokens > 0]
        for s in running:
            s.spec_token_ids = []
        if not decoding or len(decoding) > self.cfg.max_batch_size:
            return
        cands = [s for s in decoding if speculation_allowed(s.params, s)]
        ks = [self._k_for(s) for s in cands]
        chosen = [(s, k) for s, k in zip(cands, ks) if k > 0]
        if not chosen:
            return
        tokens, probs = self.proposer.propose([s for s, _ in chosen], [k for _, k in chosen])
        for (s, _), toks, q in zip(chosen, tokens, probs):
            s.spec_token_ids = list(toks)
            self.state[s.seq_id].draft_probs = q if toks else None

    def verify(self, items: list[tuple[Sequence, torch.Tensor]]) -> list[list[int]]:
        """Tokens to append per sequence, given the target's logits ``[1 + k, V]`` over its proposals."""
        if not items:
            return []
        seqs = [s for s, _ in items]
        kmax = max(len(s.spec_token_ids) for s in seqs)
        V = items[0][1].shape[-1]
        dev = items[0][1].device
        rows, params = [], []
        for s, lg in items:
            rows.append(lg)
            params += [s.params] * lg.shape[0]
        flat = torch.cat(rows)
        batch = SamplingBatch.from_params(params, [[]] * len(params), [[]] * len(params), V, dev,
                                          [0] * len(params))
        probs = probs_for(flat, batch)
        target = torch.zeros((len(seqs), kmax + 1, V), device=dev)
        drafts = torch.zeros((len(seqs), max(kmax, 1)), dtype=torch.long, device=dev)
        draft_probs = None
        if any(self.state[s.seq_id].draft_probs is not None for s in seqs):
            draft_probs = torch.zeros((len(seqs), max(kmax, 1), V), device=dev)
        off = 0
        for i, (s, lg) in enumerate(items):
            n = lg.shape[0]
            target[i, :n] = probs[off:off + n]
            off += n
            k = len(s.spec_token_ids)
            drafts[i, :k] = torch.tensor(s.spec_token_ids, device=dev)
            q = self.state[s.seq_id].draft_probs
            if draft_probs is not None and q is not None:
                draft_probs[i, :k] = q[:k].to(dev)
            elif draft_probs is not None:  # point-mass proposal inside a batch with draft distributions
                draft_probs[i, torch.arange(k, device=dev), drafts[i, :k]] = 1.0
        gens = [seeded_generator(s.params.seed, s.index * 1_000_003 + s.num_output_tokens, dev)
                if s.params.seed is not None and not s.params.greedy else None for s in seqs]
        out = verify(target, drafts, [len(s.spec_token_ids) for s in seqs], [s.params.greedy for s in seqs],
                     draft_probs, gens)
        for s, toks in zip(seqs, out):
            k, a = len(s.spec_token_ids), len(toks) - 1
            st = self.state[s.seq_id]
            st.rate = 0.8 * st.rate + 0.2 * (a / k if k else 0.0)
            for stats in (self.stats, st.stats):
                stats.proposed += k
                stats.accepted += a
                stats.verify_steps += 1
                stats.emitted += a + 1
            st.draft_probs = None
        return out

    def rollback(self, seq: Sequence, num_valid_tokens: int) -> None:
        self.proposer.rollback(seq, num_valid_tokens)

    def release(self, seq: Sequence) -> None:
        self.state.pop(seq.seq_id, None)
        self.proposer.release(seq)
