"""KV cache block manager: which physical blocks each sequence owns, prefix caching, copy-on-write.

Pure bookkeeping over block ids; the tensors live in the model runner. Design points:
- A block is free (never cached or unregistered), *evictable* (cached content, no owner, kept in LRU order
  until its space is needed), or used (refcount > 0).
- Prefix caching identifies a full block by ``(parent uid, its tokens)``, where the parent uid is a
  number unique to the registration of the previous block. Dict lookups compare the whole key, so a hash
  collision can never return a block with other contents, and an evicted parent's children become
  unreachable because no new registration can reuse its uid.
- Only blocks full of *verified* tokens are registered (speculative tokens are not), and a block that is
  shared or registered is never written in place: the writer gets a fresh copy (copy-on-write), and the
  device copy is reported in ``take_pending_copies``.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

from llmc.runtime.sequence import Sequence

_ROOT = 0


@dataclass
class KVCacheStats:
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # tokens found
    evictions: int = 0
    cow_copies: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free_list: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.cached: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent uid, tokens) -> block
        self.block_key: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}  # block -> (key, uid)
        self._uids = itertools.count(1)
        self._pending: list[tuple[int, int]] = []
        self.stats = KVCacheStats()

    # ------------------------------------------------------------------ counters
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_list) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ------------------------------------------------------------------ block primitives
    def _alloc(self) -> int:
        if self.free_list:
            b = self.free_list.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            self._unregister(b)
            self.stats.evictions += 1
        self.ref[b] = 1
        return b

    def _unregister(self, b: int) -> None:
        entry = self.block_key.pop(b, None)
        if entry is not None and self.cached.get(entry[0]) == b:
            del self.cached[entry[0]]

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            self.evictable.pop(b)
        self.ref[b] += 1

    def _release(self, b: int) -> None:
        self.ref[b] -= 1
        assert self.ref[b] >= 0, f"block {b} freed twice"
        if self.ref[b] == 0:
            if b in self.block_key:
                self.evictable[b] = None  # most recently used at the end
            else:
                self.free_list.append(b)

    # ------------------------------------------------------------------ sequences
    def get_computed_blocks(self, seq: Sequence) -> int:
        """Attach the longest cached prefix of full blocks to a block-less sequence; returns tokens covered."""
        if not self.enable_prefix_caching:
            return 0
        assert not seq.block_table, "get_computed_blocks on a sequence that already holds blocks"
        tokens, bs = seq.token_ids, self.block_size
        nfull = (len(tokens) - 1) // bs  # always leave at least one token to compute
        self.stats.prefix_queries += len(tokens)
        parent, hits = _ROOT, []
        for i in range(nfull):
            b = self.cached.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            if b is None:
                break
            hits.append(b)
            parent = self.block_key[b][1]
        for b in hits:
            self._take(b)
        seq.block_table = hits
        seq.block_hashes = [self.block_key[b][1] for b in hits]
        self.stats.prefix_hits += len(hits) * bs
        return len(hits) * bs

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> tuple[int, list[int]]:
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        total = -(-end // self.block_size)
        grow = max(0, total - len(seq.block_table))
        cow = []
        if num_new_tokens > 0:
            for i in range(start // self.block_size, min(total, len(seq.block_table))):
                b = seq.block_table[i]
                if self.ref[b] > 1 or b in self.block_key:
                    cow.append(i)
        return grow, cow

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        grow, cow = self._blocks_needed(seq, num_new_tokens)
        return grow + len(cow) <= self.num_free_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Cover positions up to ``num_computed_tokens + num_new_tokens``; False (and no change) if full."""
        grow, cow = self._blocks_needed(seq, num_new_tokens)
        if grow + len(cow) > self.num_free_blocks:
            return False
        for i in cow:
            old = seq.block_table[i]
            new = self._alloc()
            self._pending.append((old, new))
            self.stats.cow_copies += 1
            self._release(old)
            seq.block_table[i] = new
            del seq.block_hashes[i:]  # content from here on is this sequence's own
        for _ in range(grow):
            seq.block_table.append(self._alloc())
        return True

    def cache_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Register blocks full of the first ``num_tokens`` verified tokens (idempotent)."""
        if not self.enable_prefix_caching:
            return
        n = seq.num_computed_tokens if num_tokens is None else num_tokens
        bs = self.block_size
        nfull = min(n // bs, len(seq.block_table))
        if len(seq.block_hashes) >= nfull:
            return
        tokens = seq.token_ids
        parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT
        for i in range(len(seq.block_hashes), nfull):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            existing = self.cached.get(key)
            b = seq.block_table[i]
            if existing is not None:  # same content already cached elsewhere: chain through it
                uid = self.block_key[existing][1]
            elif b in self.block_key:  # registered under another prefix (should not happen): chain anyway
                uid = self.block_key[b][1]
            else:
                uid = next(self._uids)
                self.cached[key] = b
                self.block_key[b] = (key, uid)
            seq.block_hashes.append(uid)
            parent = uid

    def free(self, seq: Sequence) -> None:
        """Release all blocks (tail first, so a prefix outlives its suffix in the LRU). Idempotent."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.block_hashes = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for b in parent.block_table:
            self._take(b)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Roll back to the first ``num_tokens`` tokens (rejected speculation): drop blocks past them and
        forget hashes of blocks that are no longer full of kept tokens."""
        keep = -(-num_tokens // self.block_size)
        for b in reversed(seq.block_table[keep:]):
            self._release(b)
        del seq.block_table[keep:]
        nfull = num_tokens // self.block_size
        for i in range(nfull, len(seq.block_hashes)):
            if i < len(seq.block_table):
                b = seq.block_table[i]
                entry = self.block_key.get(b)
                if entry is not None and entry[1] == seq.block_hashes[i] and self.ref[b] == 1:
                    self._unregister(b)  # its tail will be rewritten; nobody else relies on it
        del seq.block_hashes[nfull:]

    def take_pending_copies(self) -> list[tuple[int, int]]:
        out, self._pending = self._pending, []
        return out

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block nobody holds (e.g. after weights change)."""
        while self.evictable:
            b, _ = self.evictable.popitem(last=False)
            self._unregister(b)
            self.free_list.append(b)
        return True

    # ------------------------------------------------------------------ checking
    def check_invariants(self, seqs: list[Sequence]) -> None:
        counts = [0] * self.num_blocks
        for s in seqs:
            assert len(set(s.block_table)) == len(s.block_table), f"seq {s.seq_id} holds a block twice"
            for b in s.block_table:
                counts[b] += 1
        for b in range(self.num_blocks):
            assert counts[b] == self.ref[b], f"block {b}: refcount {self.ref[b]} but {counts[b]} holders"
        free, evict = set(self.free_list), set(self.evictable)
        assert len(free) == len(self.free_list), "a block is on the free list twice"
        assert not free & evict, "a block is both free and evictable"
        for b in free | evict:
            assert self.ref[b] == 0, f"free block {b} has refcount {self.ref[b]}"
        used = {b for b in range(self.num_blocks) if self.ref[b] > 0}
        assert len(free) + len(evict) + len(used) == self.num_blocks, "blocks lost"
        for b in evict:
            assert b in self.block_key, f"evictable block {b} is not cached"
        for b in free:
            assert b not in self.block_key, f"free block {b} still cached"
        for key, b in self.cached.items():
            assert self.block_key[b][0] == key, f"cache entry for block {b} is inconsistent"
