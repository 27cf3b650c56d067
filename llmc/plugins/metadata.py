"""Attention metadata: what one flat-batch forward needs to find each token's context in the paged cache.

The execution contract (DESIGN.md): a forward takes T tokens from S sequences laid end to end, no padding
to the longest. Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; those are its
*last* ``q_len`` positions, so its context is ``seq_lens[i]`` tokens of which the first
``seq_lens[i] - q_len`` are already cached. The cache of each layer is a pool of blocks shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of sequence ``i`` lives at block
``block_tables[i, t // block_size]``, row ``t % block_size``; ``slot_mapping`` gives the flat slot
(``block * block_size + row``) where each new token's K/V are written, -1 for padding rows.
"""
from __future__ import annotations

import array
import itertools
from dataclasses import dataclass

import torch

_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}


def upload(lists: list[list], device: torch.device | str, dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
    """Device copies of host lists (all of one ``dtype``) in one host->device transfer.

    On CUDA the copy goes from pinned memory without blocking the host: a per-list
    ``torch.tensor(..., device=cuda)`` would wait for the GPU to finish all queued work once per list, and a
    decode step uploads a dozen of them. torch's pinned-memory cache keeps each staging buffer until its
    copy has run, so a later step never overwrites a transfer still in the queue."""
    device = torch.device(device)
    flat = list(itertools.chain.from_iterable(lists))
    code = _ARRAY_CODES.get(dtype)
    try:  # a typed array converts a few times faster than torch.tensor(list) (host time of every step)
        host = torch.frombuffer(array.array(code, flat), dtype=dtype) if code and flat else None
    except (TypeError, OverflowError):
        host = None
    if host is None:
        host = torch.tensor(flat, dtype=dtype)
    if device.type == "cuda":
        flat = host.pin_memory().to(device, non_blocking=True)
    else:
        flat = host.to(device)
    return list(flat.split([len(x) for x in lists]))


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, max_blocks_per_seq], unused entries 0
    max_query_len: int
    max_seq_len: int
    # Host copies: the CPU reference loops over sequences with these (no device->host syncs on GPU).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for sequences whose last ``query_lens[i]`` of ``seq_lens[i]`` tokens are new."""
        return cls.build_with(query_lens, seq_lens, block_tables, block_size, device)[0]

    @classmethod
    def build_with(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                   block_size: int, device: torch.device | str = "cpu",
                   *inputs: list[int]) -> tuple["AttentionMetadata", list[torch.Tensor]]:
        """``build`` plus int64 device copies of ``inputs`` (token ids, positions, ...), all in one upload."""
        qsl = [0]
        slots: list[int] = []
        for ql, sl, bt in zip(query_lens, seq_lens, block_tables):
            qsl.append(qsl[-1] + ql)
            if ql == 1:  # a decode token
                slots.append(bt[(sl - 1) // block_size] * block_size + (sl - 1) % block_size)
                continue
            for pos in range(sl - ql, sl):
                slots.append(bt[pos // block_size] * block_size + pos % block_size)
        width = max((len(bt) for bt in block_tables), default=1) or 1
        table = list(itertools.chain.from_iterable(bt + [0] * (width - len(bt)) for bt in block_tables))
        slot_t, qsl_t, lens_t, table_t, *extra = upload([slots, qsl, list(seq_lens), table, *inputs], device)
        meta = cls(
            slot_mapping=slot_t,
            query_start_loc=qsl_t.to(torch.int32),
            seq_lens=lens_t.to(torch.int32),
            block_tables=table_t.to(torch.int32).reshape(len(block_tables), width),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=list(seq_lens),
        )
        return meta, extra
