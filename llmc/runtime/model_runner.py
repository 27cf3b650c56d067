"""Model runner: owns the model weights and the paged KV cache on one device, turns a scheduled batch into
one flat forward, and samples.

It knows nothing of requests or policy: the scheduler says which tokens of which sequences to compute,
the runner computes them and returns logits for the rows that need a next token.
"""
from __future__ import annotations

import bisect
import itertools
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm import tqdm

from llmc.build.engine import Engine
from llmc.config import ModelConfig
from llmc.convert.checkpoint import TORCH_DTYPES
from llmc.errors import CheckpointError, ConfigError
from llmc.models.llama import LlamaForCausalLM
from llmc.plugins import ops
from llmc.plugins.kv_layout import KVCache, allocate_kv_cache, as_bytes, kv_bytes_per_token_head, kv_storage_dtype
from llmc.plugins.metadata import AttentionMetadata
from llmc.runtime.sequence import Sequence

DEFAULT_CPU_KV_BYTES = 1 << 30  # CPU has no "free memory" notion worth trusting; 1 GiB of cache by default


class ScheduledSeq(NamedTuple):
    """Compute K/V (and hidden states) for ``num_tokens`` tokens of ``seq`` starting at its
    ``num_computed_tokens``; ``sample`` asks for logits of its last scheduled token. A tuple: one is made per
    running sequence per step."""

    seq: Sequence
    num_tokens: int
    sample: bool
    num_logits: int = 1  # rows at the end that need logits: 1 + k when verifying k speculative tokens


@dataclass
class TokenFeed:
    """Where a forward's pending input tokens come from: ``input_ids[dst[i]] = tokens[src[i]]`` on the device,
    ``tokens`` being the previous step's sampled token ids."""

    tokens: torch.Tensor
    dst: list[int]
    src: list[int]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, quantized: bool = False) -> int:
    """Bytes of one block over all layers, K and V (and their scales when ``quantized``; ``dtype`` is then
    the 1-byte storage dtype)."""
    per_token_head = kv_bytes_per_token_head(cfg.head_dim, dtype, quantized)
    return cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * per_token_head


class ModelRunner:
    def __init__(self, engine: Engine, device: str | torch.device = "cpu", dtype: str | None = None,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 kv_cache_bytes: int | None = None, show_progress: bool = True,
                 cuda_graph_batch_sizes: list[int] | None = None, tp=None):
        self.engine = engine
        self.config = engine.model
        self.device = torch.device(device)
        if dtype is None:  # CPUs run bf16 matmuls slowly and inexactly: compute in float32 there
            dtype = engine.build.dtype if self.device.type == "cuda" else "float32"
        if dtype not in TORCH_DTYPES:
            raise ConfigError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
        self.dtype = TORCH_DTYPES[dtype]
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals in attention made CPU steps up to 20x slower
        self.block_size = engine.build.block_size
        self.max_seq_len = engine.build.max_seq_len
        if self.device.type == "cuda" and engine.tactics:
            from llmc.build.tuning import apply_tactics

            apply_tactics(engine.tactics)  # the kernel variants `llmc build --device cuda` timed fastest here
        self.tp = tp
        self.rank = tp.layout.rank if tp is not None else 0
        self.num_kv_heads = tp.layout.kv_heads if tp is not None else self.config.num_key_value_heads
        storage = kv_storage_dtype(engine.build.kv_cache_dtype, self.device)  # None: the compute dtype
        self.kv_quantized = storage is not None
        self.kv_dtype = storage or self.dtype
        with torch.device(self.device):
            self.model = LlamaForCausalLM(self.config, engine.quant, self.dtype, max_positions=self.max_seq_len, tp=tp)
        self._load_weights(show_progress)
        if self.device.type == "cuda" and tp is None and ops.FUSIONS["norm_gemv"]:
            self.model.fold_norms()  # decode rows' norms then run inside the 16-bit GEMVs
        self.num_kv_blocks = num_kv_blocks or self._auto_num_blocks(gpu_memory_utilization, kv_cache_bytes)
        if self.num_kv_blocks * self.block_size < self.max_seq_len:
            raise ConfigError(f"KV cache of {self.num_kv_blocks} blocks x {self.block_size} tokens cannot hold one "
                              f"sequence of max_seq_len {self.max_seq_len}; give it more memory or rebuild with a "
                              "smaller --max-seq-len")
        self.kv_caches: list[KVCache] = [
            allocate_kv_cache(self.num_kv_blocks, self.block_size, self.num_kv_heads, self.config.head_dim,
                              self.kv_dtype, self.kv_quantized, self.device)
            for _ in range(self.config.num_hidden_layers)]
        self.graphs: CudaGraphs | None = None
        self.graph_capture_seconds = 0.0
        if (self.device.type == "cuda" and cuda_graph_batch_sizes != [] and ops.has_fast("paged_attention")
                and tp is None):  # graphs around NCCL collectives are not set up yet
            sizes = cuda_graph_batch_sizes or default_graph_batch_sizes(engine.build.max_batch_size)
            t0 = time.perf_counter()
            self.graphs = CudaGraphs(self, sizes)
            self.graph_capture_seconds = time.perf_counter() - t0
        self.warmup_seconds = 0.0
        if self.device.type == "cuda" and tp is None:  # TP ranks run forwards in lockstep: rank 0 alone would hang
            t0 = time.perf_counter()
            self.warmup_kernels()
            self.warmup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ setup
    def _load_weights(self, show_progress: bool) -> None:
        from safetensors import safe_open

        params = dict(self.model.named_parameters())
        loaded: set[str] = set()
        files = self.engine.rank_weights(self.rank)
        bar = tqdm(total=len(params), desc="load weights", unit="tensor", disable=not show_progress)
        for f in files:
            try:
                sf = safe_open(str(f), framework="pt", device=str(self.device))
            except Exception as e:
                raise CheckpointError(f"{f}: corrupt engine weights ({e}); rebuild the engine") from None
            for name in sf.keys():
                p = params.get(name)
                if p is None:
                    raise CheckpointError(f"engine tensor {name!r} has no place in the model; rebuild the engine")
                t = sf.get_tensor(name)
                if t.shape != p.shape:
                    raise CheckpointError(f"engine tensor {name}: shape {tuple(t.shape)}, model expects "
                                          f"{tuple(p.shape)}; rebuild the engine")
                p.data.copy_(t)
                loaded.add(name)
                bar.update()
        bar.close()
        missing = set(params) - loaded
        if missing:
            raise CheckpointError(f"engine is missing {len(missing)} tensor(s), e.g. {sorted(missing)[0]}; rebuild it")

    def _auto_num_blocks(self, utilization: float, kv_bytes: int | None) -> int:
        per_block = kv_bytes_per_block(self.config, self.block_size, self.kv_dtype, self.kv_quantized) \
            * self.num_kv_heads // self.config.num_key_value_heads
        if kv_bytes is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                free, total = torch.cuda.mem_get_info(self.device)
                used_by_others = total - free
                activation_reserve = 2 * self.engine.build.max_num_tokens * self.config.vocab_size * 4 + (1 << 30)
                kv_bytes = int(total * utilization) - used_by_others - activation_reserve
            else:
                kv_bytes = DEFAULT_CPU_KV_BYTES
        want = self.engine.build.max_batch_size * math.ceil(self.max_seq_len / self.block_size)
        return max(1, min(want, kv_bytes // per_block))

    # ------------------------------------------------------------------ execution
    def prepare_lists(self, batch: list[ScheduledSeq]) -> tuple:
        """Host-side inputs of one forward (token ids, positions, query and context lengths, block tables,
        rows needing logits): small lists, which tensor-parallel rank 0 broadcasts to the other ranks."""
        ids: list[int] = []
        pos: list[int] = []
        q_lens, s_lens, tables, sample_rows = [], [], [], []
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            if n == 1:  # a decode token
                ids.append(seq.token_at(start))
                pos.append(start)
            else:
                ids += seq.token_slice(start, start + n)
                pos += range(start, start + n)
            q_lens.append(n)
            s_lens.append(start + n)
            tables.append(seq.block_table)
            if item.sample:
                sample_rows += range(len(ids) - item.num_logits, len(ids))
        return ids, pos, q_lens, s_lens, tables, sample_rows

    def forward(self, batch: list[ScheduledSeq], logit_rows: list[int] | None = None,
                feed: "TokenFeed | None" = None) -> torch.Tensor:
        """Run one forward; returns float32 logits ``[len(rows), vocab]`` for the sampled rows
        (or ``logit_rows`` if given: positions in the flat batch)."""
        return self.forward_lists(self.prepare_lists(batch), logit_rows, feed)

    @torch.inference_mode()
    def forward_lists(self, lists: tuple, logit_rows: list[int] | None = None,
                      feed: "TokenFeed | None" = None) -> torch.Tensor:
        """``feed`` fills the ``PENDING_TOKEN`` entries of the token ids from device tensors (the tokens the
        previous step sampled), so the host never waits for them."""
        ids, pos, q_lens, s_lens, tables, sample_rows = lists
        dev = self.device
        rows = sample_rows if logit_rows is None else logit_rows
        extra = [feed.dst, feed.src] if feed is not None else []
        meta, (input_ids, positions, rows_t, *fix) = AttentionMetadata.build_with(
            q_lens, s_lens, tables, self.block_size, dev, ids, pos, rows, *extra)
        if feed is not None:
            input_ids[fix[0]] = feed.tokens[fix[1]]
        if (self.graphs is not None and logit_rows is None and meta.is_decode_only
                and len(q_lens) <= self.graphs.max_batch_size):
            return self.graphs.run(input_ids, positions, meta)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if len(rows) == len(ids) and rows == list(range(len(ids))):
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[rows_t])

    def warmup_batches(self) -> list[list[tuple[int, int]]]:
        """(new tokens, context length) per sequence of each warm-up batch: prefill at small and large row
        counts, mixed prefill+decode with and without a split context, decode-only outside the graphs."""
        from llmc.plugins.triton_kernels import TACTICS

        long = min(2 * TACTICS["decode_min_split_tokens"] + 1, self.max_seq_len)  # long enough for a split
        big = max(2, min(300, self.engine.build.max_num_tokens - 8, self.max_seq_len))
        return [[(5, 5), (big, big)], [(7, 7), (1, 20), (1, 33)], [(9, 9), (1, long)],
                [(1, 20), (1, 30)], [(1, 20), (1, long)]]

    @torch.inference_mode()
    def warmup_kernels(self) -> None:
        """Run every kernel variant a server meets once, before the first request, so that no Triton JIT
        compile (about a second each) stalls live traffic. Writes K/V into blocks no request holds yet, so
        it must run before serving; the logits are thrown away."""
        for batch in self.warmup_batches():
            tables, next_block = [], 0
            for _, ctx in batch:
                n = -(-ctx // self.block_size)
                tables.append(list(range(next_block, next_block + n)))
                next_block += n
            if next_block > self.num_kv_blocks or sum(q for q, _ in batch) > self.engine.build.max_num_tokens:
                continue
            ids = [1] * sum(q for q, _ in batch)
            pos = [p for q, ctx in batch for p in range(ctx - q, ctx)]
            rows = list(itertools.accumulate(q for q, _ in batch))
            self.forward_lists((ids, pos, [q for q, _ in batch], [c for _, c in batch], tables,
                                [r - 1 for r in rows]))
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate cache blocks ``src -> dst`` (K, V and any scales) in every layer before
        the next forward."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for kv in self.kv_caches:
            for t in kv:
                if t is not None:
                    t = as_bytes(t)
                    t[dst] = t[src]


def default_graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [b for b in sizes if b < max_batch_size] + [max_batch_size]


class CudaGraphs:
    """Decode steps replayed from CUDA graphs captured at bucketed batch sizes (padded up to the bucket).

    One decode step of a 7B model is ~300 kernel launches; replaying a graph removes the per-launch CPU
    cost that otherwise dominates small batches. Inputs live in static buffers; padding rows write their
    K/V nowhere (slot -1) and attend over one token of block 0.
    """

    def __init__(self, runner: "ModelRunner", batch_sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.sizes[-1]
        dev, n = runner.device, self.max_batch_size
        self.max_blocks = math.ceil(runner.max_seq_len / runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            meta = self._meta(bs)
            with torch.inference_mode():
                for _ in range(2):  # warm up (Triton JIT, cuBLAS workspaces) outside the capture
                    self._forward(bs, meta)
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.logits[bs] = self._forward(bs, meta)
            self.graphs[bs] = g
        torch.cuda.synchronize(dev)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.runner.max_seq_len, query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs)

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        m = self.runner.model
        hidden = m(self.input_ids[:bs], self.positions[:bs], self.runner.kv_caches, meta)
        return m.compute_logits(hidden)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables)
        if bs > n:  # padding rows: no K/V write, attend one token of block 0
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.block_tables[n:bs].zero_()
        self.graphs[bs].replay()
        return self.logits[bs][:n]
