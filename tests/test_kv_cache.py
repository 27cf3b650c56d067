"""Block manager under random operations (hypothesis state machine), with block contents simulated: every
write must land in a block nobody else holds and nobody can look up, and every prefix-cache hit must return
blocks whose contents are exactly the requested tokens."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence

BS = 4
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5], []]


class KVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
        self.seqs: list[Sequence] = []
        self.contents: dict[int, list[int | None]] = {}

    def _write(self, seq: Sequence, start: int, end: int) -> None:
        for (src, dst) in self.kv.take_pending_copies():
            self.contents[dst] = list(self.contents.get(src, [None] * BS))
        for pos in range(start, end):
            b = seq.block_table[pos // BS]
            assert self.kv.ref[b] == 1, f"write into shared block {b}"
            assert b not in self.kv.block_key, f"write into a block others can look up ({b})"
            self.contents.setdefault(b, [None] * BS)[pos % BS] = seq.token_slice(pos, pos + 1)[0]

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(1, 6), max_size=6))
    def arrive(self, prefix, tail):
        tokens = prefix + tail
        if not tokens:
            return
        seq = Sequence("r", tokens, SamplingParams())
        hit = self.kv.get_computed_blocks(seq)
        for j, b in enumerate(seq.block_table):
            assert self.contents.get(b) == tokens[j * BS:(j + 1) * BS], "prefix cache returned wrong contents"
        seq.num_computed_tokens = hit
        assert hit < len(tokens)
        self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), n=st.integers(1, 9), nxt=st.integers(1, 6))
    def compute(self, i, n, nxt):
        seq = self.seqs[i % len(self.seqs)]
        n = min(n, seq.num_tokens - seq.num_computed_tokens)
        if n <= 0 or not self.kv.allocate_slots(seq, n):
            return
        start = seq.num_computed_tokens
        self._write(seq, start, start + n)
        seq.num_computed_tokens += n
        self.kv.cache_full_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(nxt)  # a sampled token, computed next time

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def fork(self, i):
        parent = self.seqs[i % len(self.seqs)]
        child = Sequence("r", list(parent.prompt_token_ids), SamplingParams(),
                         output_token_ids=list(parent.output_token_ids),
                         num_computed_tokens=parent.num_computed_tokens)
        self.kv.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), k=st.integers(1, 6), new=st.lists(st.integers(1, 6), min_size=1, max_size=3))
    def rollback(self, i, k, new):
        """Speculative rejection: drop the last k computed tokens, continue with different ones."""
        seq = self.seqs[i % len(self.seqs)]
        keep = max(seq.num_computed_tokens - k, seq.num_prompt_tokens)
        if keep >= seq.num_computed_tokens:
            return
        seq.output_token_ids = seq.output_token_ids[: keep - seq.num_prompt_tokens] + new
        seq.num_computed_tokens = keep
        self.kv.trim(seq, keep)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def finish(self, i):
        seq = self.seqs.pop(i % len(self.seqs))
        self.kv.free(seq)
        self.kv.free(seq)  # twice is harmless

    @invariant()
    def consistent(self):
        self.kv.check_invariants(self.seqs)

    def teardown(self):
        for s in self.seqs:
            self.kv.free(s)
        assert self.kv.num_used_blocks == 0


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_eviction_is_lru_and_only_when_needed():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    assert kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    kv.free(a)  # blocks of [1,2] and [3,4] become evictable, nothing evicted yet
    assert kv.stats.evictions == 0 and kv.num_free_blocks == 4
    b = Sequence("b", [1, 2, 3, 4, 9], SamplingParams())
    assert kv.get_computed_blocks(b) == 4  # still cached
    kv.free(b)
    c = Sequence("c", [7] * 8, SamplingParams())
    assert kv.allocate_slots(c, 8)  # needs every block: evicts the cached ones
    assert kv.stats.evictions == 2
