"""A sequence: one stream of tokens the engine generates, with the state the scheduler and KV cache track.

A request with ``n > 1`` becomes a group of sequences sharing the prompt's KV blocks (copy-on-write).
``num_computed_tokens`` counts tokens whose K/V are in the cache; the scheduler advances it as chunks are
prefilled and decodes run, rolls it back on preemption (to 0) and on rejected speculative tokens.

With pipelined steps (the engine schedules step N+1 while the GPU still runs step N) a sequence can hold
``num_pending`` tokens: sampled on the device, their values not yet read by the host. They count as positions
(``num_tokens``) but not as known tokens; ``token_slice`` shows them as ``PENDING_TOKEN`` and the runner feeds
the device values into the next forward.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from llmc.runtime.sampling_params import SamplingParams

_seq_ids = itertools.count()
PENDING_TOKEN = -1  # stands for a token sampled on the device whose value the host has not read yet


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"


# A tuple, not a set: membership is by identity in C, where a set would call Enum's Python __hash__.
FINISHED = (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    index: int = 0  # which of the request's n samples this is
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    priority: int = 0  # lower value = served first (vLLM convention)
    arrival_time: float = field(default_factory=time.monotonic)
    # Owned by the KV cache manager:
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of this sequence's full blocks, in order
    # Speculative tokens proposed for the next step (verified by the target, then cleared).
    spec_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    num_pending: int = 0  # sampled on the device, not yet read back (pipelined steps); they follow the outputs
    pending_row: int = -1  # row of the newest pending token in the last launched step's sampled tokens
    stop_reason: int | str | None = None

    @property
    def token_ids(self) -> list[int]:
        """The known tokens (prompt + read-back outputs)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Positions of the sequence, pending tokens included (what K/V are computed for)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, read back or not."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def length_exhausted(self) -> bool:
        """Its pending tokens already reach max_tokens: it finishes once they are read back, so it must not be
        scheduled again."""
        return self.num_generated >= (self.params.max_tokens or 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the last sampled one still need their K/V computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output + pending (as ``PENDING_TOKEN``) + speculative tokens,
        without building the whole list (decode steps need one token of sequences thousands long)."""
        p, o = self.prompt_token_ids, self.output_token_ids
        np_, no = len(p), len(o) + self.num_pending
        out = p[start:end] if start < np_ else []
        if end > np_:
            out = out + o[max(start - np_, 0):end - np_]
            if self.num_pending and end > np_ + len(o):
                out = out + [PENDING_TOKEN] * (min(end, np_ + no) - max(start, np_ + len(o)))
        if end > np_ + no:
            out = out + self.spec_token_ids[max(start - np_ - no, 0):end - np_ - no]
        return out

    def token_at(self, i: int) -> int:
        """``token_slice(i, i + 1)[0]`` without the slicing: a decode step's one input token."""
        p = self.prompt_token_ids
        if i < len(p):
            return p[i]
        j, o = i - len(p), self.output_token_ids
        if j < len(o):
            return o[j]
        j -= len(o)
        return PENDING_TOKEN if j < self.num_pending else self.spec_token_ids[j - self.num_pending]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
