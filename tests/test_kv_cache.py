"""KV block manager: allocation, prefix caching (hits, LRU eviction, hash collisions), fork + copy-on-write,
rollback, and a hypothesis state machine that simulates block contents: every write must land in a block
nobody else holds and nobody can look up, and every prefix-cache hit must return exactly the requested tokens."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmc.runtime import kv_cache
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence


def mkseq(tokens, **kw) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(), **kw)


def compute(kv: KVCacheManager, seq: Sequence, n: int | None = None) -> None:
    """What the engine does for one chunk: allocate, (forward), advance, publish full blocks."""
    n = seq.num_tokens - seq.num_computed_tokens if n is None else n
    assert kv.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    kv.cache_full_blocks(seq)


def snapshot(kv: KVCacheManager, *seqs: Sequence):
    return (list(kv.ref), kv.num_free_blocks, kv.num_used_blocks, dict(kv._copies),
            [(list(s.block_table), list(s.block_hashes)) for s in seqs])


# ---------------------------------------------------------------------------------------------- allocation
def test_allocation_grows_one_block_per_block_size():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    seq = mkseq(range(1, 11))
    for t in range(10):
        assert kv.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
        assert len(seq.block_table) == t // 4 + 1
        assert kv.num_used_blocks == len(seq.block_table)
        kv.check_invariants([seq])
    assert kv.usage == pytest.approx(3 / 10)
    other = mkseq(range(9))
    assert kv.can_allocate(other, 9) and kv.allocate_slots(other, 9) and len(other.block_table) == 3
    assert not set(other.block_table) & set(seq.block_table)
    assert kv.allocate_slots(other, 0) and len(other.block_table) == 3


def test_allocate_slots_out_of_blocks_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = mkseq(range(8)), mkseq(range(100, 112))
    assert kv.allocate_slots(a, 8)
    before = snapshot(kv, a, b)
    assert not kv.can_allocate(b, 12) and not kv.allocate_slots(b, 12)
    assert snapshot(kv, a, b) == before
    # Also when the shortfall comes from copy-on-write of a shared block.
    a.num_computed_tokens = 6
    child = mkseq(range(8), num_computed_tokens=6)
    kv.fork(a, child)
    assert kv.allocate_slots(b, 4)  # takes the last free block
    before = snapshot(kv, a, b, child)
    assert not kv.allocate_slots(child, 1)
    assert snapshot(kv, a, b, child) == before and kv.stats.failed_allocations == 2
    kv.check_invariants([a, b, child])


def test_free_returns_everything_and_is_idempotent():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seqs = [mkseq(range(i, i + 10)) for i in range(2)]
    for s in seqs:
        compute(kv, s)
    kv.fork(seqs[0], child := mkseq(range(10), num_computed_tokens=10))
    for s in seqs + [child]:
        kv.free(s)
        kv.free(s)
        assert s.block_table == [] and s.block_hashes == []
    assert kv.num_free_blocks == 8 and kv.num_used_blocks == 0 and kv.usage == 0
    kv.check_invariants([])


# ---------------------------------------------------------------------------------------------- prefix cache
def test_shared_prefix_hits_full_blocks_and_counts_stats():
    kv = KVCacheManager(num_blocks=64, block_size=16)
    prefix = list(range(1000, 1200))
    a, b = mkseq(prefix + [1] * 10), mkseq(prefix + [2] * 20)
    assert kv.get_computed_blocks(a) == 0
    compute(kv, a)
    assert len(a.block_hashes) == 210 // 16
    assert kv.get_computed_blocks(b) == 192
    assert b.block_table == a.block_table[:12] and b.block_hashes == a.block_hashes[:12]
    assert all(kv.ref[blk] == 2 for blk in b.block_table)
    assert kv.stats.prefix_queries == 210 + 220 and kv.stats.prefix_hits == 192
    b.num_computed_tokens = 192
    compute(kv, b)  # writes block 12 (tokens 192..207), a fresh one: no copy
    assert kv.take_pending_copies() == [] and b.block_table[12] != a.block_table[12]
    kv.check_invariants([a, b])


def test_fully_cached_sequence_leaves_a_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = mkseq(range(16))
    compute(kv, a)
    kv.free(a)  # all four blocks stay cached (evictable)
    b = mkseq(range(16))
    assert kv.get_computed_blocks(b) == 12 and len(b.block_table) == 3
    b.num_computed_tokens = 12
    compute(kv, b)  # the last block is recomputed into a fresh block
    assert kv.take_pending_copies() == [] and len(b.block_table) == 4
    c = mkseq(list(range(16)) + [99])
    assert kv.get_computed_blocks(c) == 16
    kv.check_invariants([b, c])


def test_eviction_only_when_needed_and_lru_order():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a, b = mkseq([1, 2, 3, 4, 0]), mkseq([5, 6, 7, 8, 0])
    compute(kv, a)
    compute(kv, b)
    a_blocks, b_blocks = a.block_table[:2], b.block_table[:2]
    kv.free(a)
    kv.free(b)
    # LRU (oldest first): a's [3,4], a's [1,2], b's [7,8], b's [5,6] (each freed tail first).
    # Touch a again: its blocks become the most recently used.
    probe = mkseq([1, 2, 3, 4, 0])
    assert kv.get_computed_blocks(probe) == 4 and probe.block_table == a_blocks
    kv.free(probe)
    c = mkseq(range(100, 104))
    assert kv.allocate_slots(c, 4)  # two truly free blocks remain: nothing is evicted
    assert kv.stats.evictions == 0 and set(c.block_table).isdisjoint(a_blocks + b_blocks)
    d = mkseq(range(200, 202))
    assert kv.allocate_slots(d, 2)  # evicts the least recently used: b's tail [7,8]
    assert kv.stats.evictions == 1 and d.block_table == [b_blocks[1]]
    assert kv.cached_tokens(b_blocks[1]) is None and kv.cached_tokens(b_blocks[0]) == (5, 6)
    e = mkseq([5, 6, 7, 8, 0])
    assert kv.get_computed_blocks(e) == 2
    f = mkseq([1, 2, 3, 4, 0])
    assert kv.get_computed_blocks(f) == 4
    kv.check_invariants([c, d, e, f])


def test_hash_collisions_never_return_wrong_blocks(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block_tokens", lambda parent, tokens: 7)
    kv = KVCacheManager(num_blocks=16, block_size=4)
    x = mkseq([1, 1, 1, 1, 3, 3, 3, 3, 0])
    y = mkseq([2, 2, 2, 2, 4, 4, 4, 4, 0])
    compute(kv, x)
    compute(kv, y)
    # Same tokens as x's second block but after y's first: only the first block may hit.
    z = mkseq([2, 2, 2, 2, 3, 3, 3, 3, 0])
    assert kv.get_computed_blocks(z) == 4 and z.block_table == y.block_table[:1]
    w = mkseq([9, 9, 9, 9, 9])
    assert kv.get_computed_blocks(w) == 0
    v = mkseq([1, 1, 1, 1, 3, 3, 3, 3, 5])
    assert kv.get_computed_blocks(v) == 8 and v.block_table == x.block_table[:2]
    kv.check_invariants([x, y, z, w, v])


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = mkseq([1, 2, 3, 4, 5])
    compute(kv, a)
    assert a.block_hashes == []
    kv.free(a)
    b = mkseq([1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(b) == 0 and kv.stats.prefix_queries == 0
    assert kv.reset_prefix_cache()


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a, b = mkseq([1, 2, 3]), mkseq([4, 5, 6])
    compute(kv, a)
    compute(kv, b)
    kv.free(a)
    assert not kv.reset_prefix_cache()  # b's block is still registered and held
    assert kv.get_computed_blocks(mkseq([1, 2, 3])) == 0
    kv.free(b)
    assert kv.reset_prefix_cache() and kv.num_free_blocks == 8
    kv.check_invariants([])


# ---------------------------------------------------------------------------------------------- fork / CoW
def test_fork_copy_on_write_of_partial_last_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = mkseq(range(10))  # two full blocks + a partial one
    compute(kv, parent)
    child = mkseq(range(10), num_computed_tokens=10)
    kv.fork(parent, child)
    assert child.block_table == parent.block_table and child.block_hashes == parent.block_hashes
    assert all(kv.ref[b] == 2 for b in parent.block_table)
    child.append_token(50)
    assert kv.allocate_slots(child, 1)  # writes position 10, in the shared partial block
    assert kv.take_pending_copies() == [(parent.block_table[2], child.block_table[2])]
    assert kv.take_pending_copies() == []
    assert child.block_table[2] != parent.block_table[2] and child.block_table[:2] == parent.block_table[:2]
    assert [kv.ref[b] for b in parent.block_table] == [2, 2, 1]
    parent.append_token(60)
    assert kv.allocate_slots(parent, 1) and kv.take_pending_copies() == []  # now its own: written in place
    kv.check_invariants([parent, child])


def test_pending_copy_dropped_when_destination_freed():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = mkseq(range(6))
    compute(kv, parent)
    child = mkseq(range(6), num_computed_tokens=6)
    kv.fork(parent, child)
    child.append_token(1)
    assert kv.allocate_slots(child, 1)
    kv.free(child)  # preempted before the copy ran: its destination may be reused at once
    assert kv.take_pending_copies() == []
    kv.check_invariants([parent])


def test_writing_a_cached_block_copies_it():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = mkseq(range(9))
    compute(kv, a)
    b = mkseq(range(9))
    assert kv.get_computed_blocks(b) == 8
    b.num_computed_tokens = 4  # e.g. the caller recomputes block 1: it is registered and shared
    assert kv.allocate_slots(b, 5)
    assert kv.take_pending_copies() == [(a.block_table[1], b.block_table[1])]
    assert len(b.block_hashes) == 1 and b.block_table[0] == a.block_table[0]
    # Sole holder, but registered: others may find it later, so it is copied too (and stays cached).
    kv.free(b)
    cached = a.block_table[1]
    a.num_computed_tokens = 4
    assert kv.allocate_slots(a, 5) and kv.take_pending_copies() == [(cached, a.block_table[1])]
    assert kv.cached_tokens(cached) == (4, 5, 6, 7) and kv.ref[cached] == 0
    kv.check_invariants([a])


def test_copy_of_a_pending_copy_reads_the_original():
    """Copies run all at once, so a copy out of a block whose own copy is still pending reads its source."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = mkseq(range(6))
    compute(kv, a)
    b = mkseq(range(6), num_computed_tokens=6)
    kv.fork(a, b)
    b.append_token(1)
    assert kv.allocate_slots(b, 1)  # a[1] -> b[1]
    c = mkseq(range(7), num_computed_tokens=6)
    kv.fork(b, c)
    c.append_token(2)
    assert kv.allocate_slots(c, 1)  # b[1] is not filled yet: c[1] must come from a[1]
    assert sorted(kv.take_pending_copies()) == sorted([(a.block_table[1], b.block_table[1]),
                                                       (a.block_table[1], c.block_table[1])])
    kv.check_invariants([a, b, c])


# ---------------------------------------------------------------------------------------------- trim
def test_trim_rolls_back():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = mkseq(range(14))
    compute(kv, seq)
    blocks = list(seq.block_table)
    assert len(seq.block_hashes) == 3
    kv.trim(seq, 9)
    assert seq.block_table == blocks[:3] and len(seq.block_hashes) == 2 and seq.num_computed_tokens == 9
    assert kv.cached_tokens(blocks[2]) is None  # its tail will be rewritten, nobody else holds it
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 5
    seq.output_token_ids = [77] * 5  # tokens 9.. differ now
    compute(kv, seq)
    assert kv.take_pending_copies() == [] and seq.block_table[:3] == blocks[:3]  # written in place
    # A shared partial block stays cached; the writer copies it instead.
    child = mkseq(range(10), num_computed_tokens=10)
    kv.fork(seq, child)
    kv.trim(seq, 10)
    assert kv.cached_tokens(seq.block_table[2]) is not None
    seq.append_token(5)
    assert kv.allocate_slots(seq, 1) and len(kv.take_pending_copies()) == 1
    kv.trim(seq, 0)
    assert seq.block_table == [] and seq.block_hashes == [] and seq.num_computed_tokens == 0
    kv.check_invariants([seq, child])


# ---------------------------------------------------------------------------------------------- state machine
BS = 4
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 3, 4], []]


class KVMachine(RuleBasedStateMachine):
    """Engine-like steps over a small pool. ``contents`` simulates the device: block -> token per row."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=8, block_size=BS)
        self.seqs: list[Sequence] = []
        self.contents: dict[int, list[int | None]] = {}

    def _lookup(self, seq: Sequence) -> None:
        hit = self.kv.get_computed_blocks(seq)
        tokens = seq.token_ids
        assert hit % BS == 0 and hit < len(tokens) and len(seq.block_table) == hit // BS
        for j, b in enumerate(seq.block_table):
            assert self.contents.get(b) == tokens[j * BS:(j + 1) * BS], "prefix cache returned wrong contents"
        seq.num_computed_tokens = hit

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(1, 3), max_size=7))
    def arrive(self, prefix, tail):
        if prefix + tail:
            seq = mkseq(prefix + tail)
            self._lookup(seq)
            self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(picks=st.lists(st.tuples(st.integers(0, 99), st.integers(1, 9)), min_size=1, max_size=4),
          preempt=st.booleans(), sampled=st.integers(1, 3))
    def step(self, picks, preempt, sampled):
        self._step(picks, preempt, sampled)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def complete(self, i):
        """A request's whole life: compute the rest in one chunk, then finish (its blocks stay cached)."""
        seq = self.seqs[i % len(self.seqs)]
        self._step([(i, 99)], False, 1)
        self.seqs.remove(seq)
        self.kv.free(seq)

    def _step(self, picks, preempt, sampled):
        """Schedule a few sequences (allocate), maybe preempt one, run copies, write K/V, commit."""
        batch = []
        for i, n in picks:
            seq = self.seqs[i % len(self.seqs)]
            if any(s is seq for s, _ in batch):
                continue
            if not seq.block_table and seq.num_computed_tokens == 0:
                self._lookup(seq)  # (re)admission after preemption
            n = min(n, seq.num_tokens - seq.num_computed_tokens)
            before = (list(self.kv.ref), list(seq.block_table), list(seq.block_hashes), self.kv.num_free_blocks)
            if self.kv.allocate_slots(seq, n):
                batch.append((seq, n))
            else:
                after = (list(self.kv.ref), list(seq.block_table), list(seq.block_hashes), self.kv.num_free_blocks)
                assert before == after, "failed allocate_slots changed state"
        if preempt and batch:
            victim, _ = batch.pop()
            self.kv.free(victim)
            victim.num_computed_tokens = 0
        copies = self.kv.take_pending_copies()
        dsts = [d for _, d in copies]
        assert len(set(dsts)) == len(dsts), "duplicate copy destination"
        gathered = [list(self.contents.get(s, [None] * BS)) for s, _ in copies]  # all at once, like the runner
        for (_, d), rows in zip(copies, gathered):
            self.contents[d] = rows
        for seq, n in batch:
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                b = seq.block_table[pos // BS]
                assert self.kv.ref[b] == 1, f"write into shared block {b}"
                assert self.kv.cached_tokens(b) is None, f"write into a block others can look up ({b})"
                self.contents.setdefault(b, [None] * BS)[pos % BS] = seq.token_ids[pos]
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(sampled)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def fork(self, i):
        parent = self.seqs[i % len(self.seqs)]
        child = mkseq(parent.prompt_token_ids, output_token_ids=list(parent.output_token_ids),
                      num_computed_tokens=parent.num_computed_tokens)
        self.kv.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), k=st.integers(1, 6), new=st.lists(st.integers(1, 3), min_size=1, max_size=3))
    def rollback(self, i, k, new):
        """Speculative rejection: drop the last k computed tokens and continue with different ones."""
        seq = self.seqs[i % len(self.seqs)]
        keep = max(seq.num_computed_tokens - k, 0)
        if keep >= seq.num_computed_tokens:
            return
        np_ = seq.num_prompt_tokens
        seq.output_token_ids = seq.output_token_ids[:max(keep - np_, 0)] + new
        self.kv.trim(seq, keep)
        assert seq.num_computed_tokens == keep and len(seq.block_table) == -(-keep // BS)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def finish(self, i):
        seq = self.seqs.pop(i % len(self.seqs))
        self.kv.free(seq)
        self.kv.free(seq)  # twice is harmless

    @rule(x=st.integers(0, 9))
    def reset_cache(self, x):
        if x == 0:  # rarely: a reset empties the cache the other rules build up
            self.kv.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.kv.check_invariants(self.seqs)
        for s in self.seqs:  # every computed token's K/V is where the block table says
            tokens = s.token_ids
            for pos in range(s.num_computed_tokens):
                assert self.contents[s.block_table[pos // BS]][pos % BS] == tokens[pos], f"seq {s.seq_id} pos {pos}"
        for b in range(self.kv.num_blocks):  # every cached block holds what it is registered with
            cached = self.kv.cached_tokens(b)
            assert cached is None or tuple(self.contents.get(b, ())) == cached, f"cached block {b} corrupted"

    def teardown(self):
        for s in self.seqs:
            self.kv.free(s)
        self.kv.check_invariants([])
        assert self.kv.num_used_blocks == 0 and self.kv.num_free_blocks == self.kv.num_blocks
        self.kv.reset_prefix_cache()
        assert len(self.kv._free) == self.kv.num_blocks


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
