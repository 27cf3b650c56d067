"""In-flight batching scheduler: every step one flat batch of running decodes plus prefill chunks.

Policy (vLLM v1's unified shape, in our words): each sequence simply has tokens whose K/V are not yet
computed; a step hands out a token budget (``max_num_tokens``) first to running sequences in priority
order (decodes take one token, or 1 + k with speculative tokens; unfinished prefills take a chunk), then
to waiting sequences, FCFS within a priority. A long prompt therefore prefills in chunks while decodes
keep flowing. When blocks run out, the lowest-priority, newest running sequence is preempted: its blocks
are freed and it is recomputed later (its full blocks usually survive in the prefix cache). No new
sequence is admitted in a step that had to preempt, which rules out admit/preempt ping-pong.

Admission policy (TensorRT-LLM's two, by their names): ``max_utilization`` (the default, vLLM's) admits a
request when its next chunk fits and preempts later if decodes run out of blocks; ``guaranteed_no_evict``
admits it only when the blocks for its whole length (prompt + max_tokens, for each of its n samples) fit
beside what the running sequences may still grow to, so nothing is ever preempted and recomputed. The second
wins when outputs run to max_tokens (benchmarks at max load, long generations); the first packs more
sequences when most stop early.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmc.config import SCHEDULER_POLICIES as POLICIES
from llmc.errors import ConfigError
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.model_runner import ScheduledSeq
from llmc.runtime.sequence import Sequence, SequenceStatus


def _order(seq: Sequence) -> tuple:
    return (seq.priority, seq.arrival_time, seq.seq_id)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_tokens: int, max_batch_size: int,
                 max_prefill_chunk: int | None = None, policy: str = "max_utilization"):
        if policy not in POLICIES:
            raise ConfigError(f"--scheduler-policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.kv = kv
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.max_prefill_chunk = max_prefill_chunk or max_num_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    # ------------------------------------------------------------------ queue management
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (n > 1) joins the batch directly."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and release its blocks (idempotent)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def _tokens_wanted(self, seq: Sequence) -> int:
        want = seq.num_tokens + len(seq.spec_token_ids) - seq.num_computed_tokens
        if seq.in_prefill:
            want = min(want, self.max_prefill_chunk)
        return want

    def _blocks_to_finish(self, seq: Sequence) -> int:
        """Blocks ``seq`` may still take before it finishes: its whole length (prompt + max_tokens) less what it
        holds. Until a request with n samples forks (at its first token), the other samples' outputs, after the
        prompt they will share, count too."""
        bs, n = self.kv.block_size, seq.params.n if seq.index == 0 and seq.num_generated == 0 else 1
        prompt, out = len(seq.prompt_token_ids), seq.params.max_tokens or 0
        whole = -(-(prompt + out) // bs) + (n - 1) * (-(-out // bs) + 1)
        return max(0, whole - len(seq.block_table))

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)

    def _item(self, seq: Sequence, n: int) -> ScheduledSeq:
        end = seq.num_computed_tokens + n
        sample = end >= seq.num_tokens
        return ScheduledSeq(seq, n, sample, num_logits=1 + len(seq.spec_token_ids) if sample else 1)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        self.running.sort(key=_order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and seq.length_exhausted:  # finishes when its pending token is read back
                i += 1
                continue
            n = min(self._tokens_wanted(seq), budget)
            if n < seq.num_tokens + len(seq.spec_token_ids) - seq.num_computed_tokens and seq.spec_token_ids:
                seq.spec_token_ids = []  # cannot verify a partial proposal: fall back to plain decode
                n = min(self._tokens_wanted(seq), budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running.pop()  # lowest priority, newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    n = 0
                    break
            if n == 0:
                continue
            out.scheduled.append(self._item(seq, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        self.waiting.sort(key=_order)
        no_evict = self.policy == "guaranteed_no_evict"
        reserved = None  # blocks the running sequences may still take; summed only when a request could fit
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if no_evict and self.running:  # alone, a request is admitted even if its n samples cannot all fit
                need = self._blocks_to_finish(seq)
                if need > self.kv.num_free_blocks:
                    break
                if reserved is None:
                    reserved = sum(self._blocks_to_finish(s) for s in self.running)
                if reserved + need > self.kv.num_free_blocks:
                    break
            if not seq.block_table and seq.num_computed_tokens == 0:
                cached = self.kv.get_computed_blocks(seq)
                seq.num_computed_tokens = cached
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = cached
            n = min(self._tokens_wanted(seq), budget)
            if not self.kv.allocate_slots(seq, n):
                self.kv.free(seq)  # give back the prefix-cache blocks it borrowed; retry next step
                seq.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            if reserved is not None:
                reserved += self._blocks_to_finish(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(self._item(seq, n))
            budget -= n
        return out

    def commit(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled tokens' K/V are in the cache; publish full blocks for reuse.

        Speculative tokens are counted too; the verifier rolls back the rejected ones afterwards."""
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            self.kv.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))
