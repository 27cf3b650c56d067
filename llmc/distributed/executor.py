"""TPExecutor: the model runner of a tensor-parallel engine.

Rank 0 lives in the engine process and runs the scheduler once; ranks 1..N-1 are spawned worker processes
holding their own weight shard and KV cache. Each step rank 0 broadcasts the step's small host-side inputs
(token ids, positions, lengths, block tables) with ``broadcast_object_list``; every rank runs the same
forward on its shard, with all-reduces after the row-parallel layers (inside the model), and rank 0 gets
the full logits through the all-gather of the vocab-parallel head. torch.distributed does the transport:
NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import atexit
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmc.build.engine import Engine, load_engine
from llmc.build.sharding import tp_layout
from llmc.models.llama import TP
from llmc.runtime.model_runner import ModelRunner

_active: "TPExecutor | None" = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, size: int, port: int, device: str) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timedelta(minutes=10))


def _device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device == "cuda" else "cpu"


def _worker(engine_dir: str, rank: int, size: int, port: int, device: str, dtype: str | None) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    _init(rank, size, port, device)
    engine = load_engine(engine_dir)
    msg = [None]
    dist.broadcast_object_list(msg, src=0)  # the KV cache size rank 0 chose
    runner = ModelRunner(engine, _device(device, rank), dtype, num_kv_blocks=msg[0], show_progress=False,
                         cuda_graph_batch_sizes=[], tp=TP(tp_layout(engine.model, rank, size)))
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        op, args = msg[0]
        if op == "forward":
            runner.forward_lists(*args)
        elif op == "copy":
            runner.copy_blocks(args)
        else:
            break
    dist.destroy_process_group()


class TPExecutor:
    """Same surface as ``ModelRunner`` for the engine: forward, copy_blocks, num_kv_blocks, device, ..."""

    def __init__(self, engine: Engine, device: str = "cpu", dtype: str | None = None,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 kv_cache_bytes: int | None = None, show_progress: bool = True):
        global _active
        if _active is not None:  # one default process group per process
            _active.shutdown()
        size = engine.build.tp_size
        if device == "cuda" and torch.cuda.device_count() < size:
            from llmc.errors import ConfigError

            raise ConfigError(f"engine needs {size} GPUs (--tp-size {size}); this machine has "
                              f"{torch.cuda.device_count()}")
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker, args=(str(engine.path), r, size, port, device, dtype), daemon=True)
                      for r in range(1, size)]
        for p in self.procs:
            p.start()
        _init(0, size, port, device)
        self.runner = ModelRunner(engine, _device(device, 0), dtype, num_kv_blocks, gpu_memory_utilization,
                                  kv_cache_bytes, show_progress, cuda_graph_batch_sizes=[],
                                  tp=TP(tp_layout(engine.model, 0, size)))
        dist.broadcast_object_list([self.runner.num_kv_blocks], src=0)
        self.closed = False
        _active = self
        atexit.register(self.shutdown)

    def __getattr__(self, name):  # device, dtype, num_kv_blocks, block_size, model, graph_capture_seconds ...
        return getattr(self.__dict__["runner"], name)

    def forward(self, batch, logit_rows=None) -> torch.Tensor:
        lists = self.runner.prepare_lists(batch)
        dist.broadcast_object_list([("forward", (lists, logit_rows))], src=0)
        return self.runner.forward_lists(lists, logit_rows)

    def copy_blocks(self, pairs) -> None:
        if pairs:
            dist.broadcast_object_list([("copy", pairs)], src=0)
            self.runner.copy_blocks(pairs)

    def shutdown(self) -> None:
        global _active
        if self.closed:
            return
        self.closed = True
        try:
            dist.broadcast_object_list([("stop", None)], src=0)
            dist.destroy_process_group()
        except Exception:
            pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if _active is self:
            _active = None
