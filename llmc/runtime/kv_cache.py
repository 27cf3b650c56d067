"""KV cache block manager: which physical blocks each sequence owns, prefix caching, copy-on-write.

Pure bookkeeping over block ids 0..num_blocks-1; the tensors live in the model runner. A block is in exactly
one of three states: *free* (on the free list, content meaningless), *evictable* (refcount 0 but registered in
the prefix cache, kept in LRU order until its space is needed) or *used* (refcount > 0).

Prefix cache. A full block is registered under ``(parent id, its tokens)``, where the parent id names the
whole token prefix before it. Ids are handed out by a counter and never reused, so equal ids mean equal
prefixes; ``seq.block_hashes`` holds these ids. Lookups go through ``hash_block_tokens`` buckets and then
compare parent id and tokens exactly, so a hash collision costs a compare, never wrong KV. When a parent is
evicted its children become unreachable (no one can reproduce its id) and simply age out of the LRU.

Writes. Only blocks full of *verified* tokens are registered, and a block that is shared or registered is
never written in place: ``allocate_slots`` gives the writer a fresh block and records a device copy
(``take_pending_copies``). The copies of one step are meant to be applied all at once (gather every source,
then scatter), which is what ``ModelRunner.copy_blocks`` does; destinations are unique.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NamedTuple

from llmc.runtime.sequence import Sequence

ROOT = 0  # id of the empty prefix


def hash_block_tokens(parent: int, tokens: tuple[int, ...]) -> int:
    """Lookup bucket of a full block. Any function works (entries are verified): tests swap in a constant."""
    return hash((parent, tokens))


class _Entry(NamedTuple):
    bucket: int
    parent: int  # id of the prefix before this block
    tokens: tuple[int, ...]
    uid: int  # id of the prefix up to and including this block


@dataclass
class KVCacheStats:
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # tokens found
    evictions: int = 0
    cow_copies: int = 0
    failed_allocations: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable blocks, least recently used first
        self._entry: dict[int, _Entry] = {}  # registered block -> its key
        self._buckets: dict[int, list[int]] = {}  # hash -> registered blocks (almost always one)
        self._uids = itertools.count(ROOT + 1)
        self._copies: dict[int, int] = {}  # pending copy-on-write, dst -> src
        self.stats = KVCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def cached_tokens(self, block: int) -> tuple[int, ...] | None:
        """The tokens a block is registered with, None if it is not in the prefix cache (for tests/debugging)."""
        e = self._entry.get(block)
        return e.tokens if e else None

    # ------------------------------------------------------------------ block primitives
    def _alloc(self) -> int:
        """A fresh block; evicts the least recently used cached one only when the free list is empty."""
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._lru.popitem(last=False)
            self._uncache(b)
            self.stats.evictions += 1
        self.ref[b] = 1
        return b

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            del self._lru[b]
        self.ref[b] += 1

    def _release(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise AssertionError(f"block {b} released more often than taken")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self._copies.pop(b, None)  # nobody will read it: a pending copy into it is moot
            if b in self._entry:
                self._lru[b] = None  # most recently used at the end
            else:
                self._free.append(b)

    def _lookup(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        for b in self._buckets.get(hash_block_tokens(parent, tokens), ()):
            e = self._entry[b]
            if e.parent == parent and e.tokens == tokens:
                return b
        return None

    def _register(self, b: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Make block ``b`` (holding ``tokens`` after prefix ``parent``) findable; returns its prefix id."""
        existing = self._lookup(parent, tokens)
        if existing is not None:  # same content already findable (maybe b itself): chain through it
            return self._entry[existing].uid
        uid = next(self._uids)
        if b not in self._entry:  # else b is registered under another prefix: keep that, chain privately
            key = hash_block_tokens(parent, tokens)
            self._entry[b] = _Entry(key, parent, tokens, uid)
            self._buckets.setdefault(key, []).append(b)
        return uid

    def _uncache(self, b: int) -> None:
        e = self._entry.pop(b, None)
        if e is not None:
            bucket = self._buckets[e.bucket]
            bucket.remove(b)
            if not bucket:
                del self._buckets[e.bucket]

    # ------------------------------------------------------------------ sequences
    def get_computed_blocks(self, seq: Sequence) -> int:
        """Attach the longest cached prefix of full blocks to a block-less sequence; returns tokens covered.
        At least one token is left uncovered: the forward needs a query to produce the next logits."""
        if not self.enable_prefix_caching:
            return 0
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"get_computed_blocks on sequence {seq.seq_id}, which already has KV")
        tokens, bs = seq.token_ids, self.block_size
        parent, hits, ids = ROOT, [], []
        for i in range((len(tokens) - 1) // bs):
            b = self._lookup(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            if b is None:
                break
            parent = self._entry[b].uid
            hits.append(b)
            ids.append(parent)
        for b in hits:
            self._take(b)
        seq.block_table, seq.block_hashes = hits, ids
        self.stats.prefix_queries += len(tokens)
        self.stats.prefix_hits += len(hits) * bs
        return len(hits) * bs

    def _plan(self, seq: Sequence, num_new_tokens: int) -> tuple[int, list[int]]:
        """(blocks to append, indices of blocks to copy before writing) for the next ``num_new_tokens``."""
        start, bs, table = seq.num_computed_tokens, self.block_size, seq.block_table
        need = -(-(start + num_new_tokens) // bs)
        cow = [i for i in range(start // bs, min(need, len(table)))
               if self.ref[table[i]] > 1 or table[i] in self._entry] if num_new_tokens > 0 else []
        return max(0, need - len(table)), cow

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        grow, cow = self._plan(seq, num_new_tokens)
        return grow + len(cow) <= self.num_free_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Cover positions up to ``num_computed_tokens + num_new_tokens``, copying shared or cached blocks
        that will be written. All or nothing: returns False, changing nothing, if blocks are short."""
        if num_new_tokens == 1:  # a decode token: most often it lands in a block this sequence alone writes
            i, table = seq.num_computed_tokens // self.block_size, seq.block_table
            if i < len(table) and self.ref[table[i]] == 1 and table[i] not in self._entry:
                return True
        grow, cow = self._plan(seq, num_new_tokens)
        if grow + len(cow) > self.num_free_blocks:
            self.stats.failed_allocations += 1
            return False
        table, old = seq.block_table, []
        for i in cow:
            src, dst = table[i], self._alloc()
            # If src is itself a copy not yet made, copy from its source (copies are applied at once).
            self._copies[dst] = self._copies.get(src, src)
            table[i] = dst
            old.append(src)
        table.extend(self._alloc() for _ in range(grow))
        for b in old:  # only now, so that none of them is evicted and reused as a destination above
            self._release(b)
        if cow:
            self.stats.cow_copies += len(cow)
            del seq.block_hashes[cow[0]:]  # from here on the content is this sequence's own
        return True

    def cache_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Register the blocks full of the first ``num_tokens`` tokens (default: the computed ones), which the
        caller vouches are verified (not speculative) and whose values are known (not pending). Idempotent; cheap
        when nothing new is full."""
        if not self.enable_prefix_caching:
            return
        n = seq.num_computed_tokens if num_tokens is None else num_tokens
        bs, done = self.block_size, len(seq.block_hashes)
        if n // bs <= done:  # nothing new is full (the common decode step)
            return
        nfull = min(min(n, seq.num_known_tokens) // bs, len(seq.block_table))  # pending tokens have no value yet
        if done >= nfull:
            return
        tokens = seq.token_slice(done * bs, nfull * bs)
        parent = seq.block_hashes[-1] if done else ROOT
        for j in range(nfull - done):
            parent = self._register(seq.block_table[done + j], parent, tuple(tokens[j * bs:(j + 1) * bs]))
            seq.block_hashes.append(parent)

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks, tail first so a prefix outlives its suffixes in the LRU. Idempotent."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table, seq.block_hashes = [], []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares all of parent's blocks; the first write to a shared block copies it."""
        self.free(child)
        for b in parent.block_table:
            self._take(b)
        child.block_table, child.block_hashes = list(parent.block_table), list(parent.block_hashes)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Roll back to the first ``num_tokens`` tokens (rejected speculation): release the blocks past them,
        forget hashes of blocks no longer full of kept tokens, and un-register the partially kept block when
        only seq holds it (seq will overwrite its tail; shared ones stay cached and get copied on write)."""
        bs, table = self.block_size, seq.block_table
        keep, nfull = -(-num_tokens // bs), num_tokens // bs
        for b in reversed(table[keep:]):
            self._release(b)
        del table[keep:]
        del seq.block_hashes[nfull:]
        if nfull < len(table) and self.ref[table[nfull]] == 1:
            self._uncache(table[nfull])
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies to run before the next forward, all at once; clears the list."""
        out = [(src, dst) for dst, src in self._copies.items()]
        self._copies = {}
        return out

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block nobody holds (e.g. after the weights change). True if the cache is now
        empty, False if blocks held by running sequences are still registered."""
        while self._lru:
            b, _ = self._lru.popitem(last=False)
            self._uncache(b)
            self._free.append(b)
        return not self._entry

    # ------------------------------------------------------------------ checking
    def check_invariants(self, seqs: list[Sequence]) -> None:
        """For tests: the bookkeeping agrees with the live ``seqs``. Raises AssertionError naming the fault."""
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise AssertionError(msg)

        holders = [0] * self.num_blocks
        for s in seqs:
            check(len(set(s.block_table)) == len(s.block_table), f"seq {s.seq_id} holds a block twice")
            check(len(s.block_hashes) <= len(s.block_table), f"seq {s.seq_id} has hashes for blocks it lacks")
            for b in s.block_table:
                holders[b] += 1
        for b in range(self.num_blocks):
            check(holders[b] == self.ref[b], f"block {b}: refcount {self.ref[b]} but {holders[b]} live holders")
        free, lru = set(self._free), set(self._lru)
        check(len(free) == len(self._free), "a block is on the free list twice")
        check(not free & lru, f"blocks {sorted(free & lru)} are both free and evictable")
        for b in free | lru:
            check(self.ref[b] == 0, f"block {b} is free or evictable but referenced ({self.ref[b]})")
        used = sum(r > 0 for r in self.ref)
        check(len(free) + len(lru) + used == self.num_blocks, "blocks are neither free, evictable nor used")
        check(lru <= self._entry.keys(), f"evictable blocks {sorted(lru - self._entry.keys())} are not cached")
        check(not free & self._entry.keys(), f"free blocks {sorted(free & self._entry.keys())} still cached")
        keys = set()
        for b, e in self._entry.items():
            check(b in self._buckets.get(e.bucket, ()), f"cached block {b} is missing from its bucket")
            check((e.parent, e.tokens) not in keys, f"two cached blocks share block {b}'s key")
            keys.add((e.parent, e.tokens))
        check(sum(map(len, self._buckets.values())) == len(self._entry), "stale block in a hash bucket")
        for dst in self._copies:
            check(self.ref[dst] > 0, f"pending copy into unreferenced block {dst}")
