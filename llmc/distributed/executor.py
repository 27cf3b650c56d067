"""TPExecutor: the model runner of a tensor-parallel engine.

Rank 0 lives in the engine process and runs the scheduler once; ranks 1..N-1 are spawned worker processes,
each holding its own weight shard and KV cache (its share of the KV heads). Each step rank 0 broadcasts the
step's host-side inputs (token ids, positions, query/context lengths, block tables, rows needing logits,
pending copy-on-write block copies) as one ``broadcast_object_list`` message; every rank builds the same
device tensors and attention metadata from it and runs the same forward on its shard. The model's own
collectives (all-reduce after the row-parallel layers and the vocab-parallel embedding, all-gather of the
vocab-parallel LM head) go over the default process group: NCCL on GPUs, gloo on CPUs. Rank 0 gets the
full logits.

Why one message of host lists rather than several tensor broadcasts: every rank needs the host lists anyway
(the attention metadata keeps CPU copies), the lists are small (a few KB for a 2k-token step), and one
message costs one round trip instead of one per tensor.

The control messages travel over a separate CPU (gloo) group with a very long timeout, because workers sit
in that receive whenever the engine is idle: with the default 10-minute collective timeout an idle server
would lose its workers. Failures are handled by liveness, not timeouts: rank 0 watches its workers' process
sentinels (a dead worker makes the next step raise instead of hanging), workers exit when rank 0's process
goes away, and ``shutdown`` (also registered with ``atexit``) stops them, so no process outlives the engine.

CUDA graphs (opt-in, ``LLMC_TP_CUDA_GRAPHS=1``): every rank captures the same decode batch sizes after the
warm-up forwards have initialized the NCCL communicator, so the graphs contain the NCCL kernels; ranks replay
in lockstep because they take the same graph-or-eager decision from the same broadcast inputs; if any rank
fails to capture, all run eager. Off by default because its one GPU run so far (2x H200, torch 2.11, NCCL
2.28) hung somewhere not recorded, with an NCCL teardown order that has been fixed since; eager TP ran there.

Scripts that create a tensor-parallel engine need the usual ``if __name__ == "__main__":`` guard, as with
any spawn-based multiprocessing.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait as wait_sentinels

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmc import errors
from llmc.build.engine import Engine, load_engine
from llmc.build.sharding import tp_layout
from llmc.errors import ConfigError
from llmc.models.llama import TP
from llmc.plugins import ops
from llmc.runtime.model_runner import CudaGraphs, ModelRunner, default_graph_batch_sizes

STARTUP_TIMEOUT_S = 600.0
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # one step's collectives; ranks arrive together
IDLE_TIMEOUT = timedelta(days=365)  # the control channel: workers wait in it while the engine is idle

_active: "TPExecutor | None" = None


def _device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device == "cuda" else "cpu"


def _init_groups(store, rank: int, size: int, device: str):
    """Default group for the model's collectives; returns the CPU control group."""
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _make_runner(engine: Engine, rank: int, size: int, device: str, dtype: str | None, num_kv_blocks,
                 gpu_memory_utilization: float, kv_cache_bytes, show_progress: bool) -> ModelRunner:
    return ModelRunner(engine, _device(device, rank), dtype, num_kv_blocks, gpu_memory_utilization, kv_cache_bytes,
                       show_progress, cuda_graph_batch_sizes=[], tp=TP(tp_layout(engine.model, rank, size)))


def _start(runner: ModelRunner | None, error: tuple[str, str] | None, ctl, graph_sizes: list[int] | None) -> list:
    """Collective startup handshake, identical on every rank: share load errors and KV sizes, then capture
    CUDA graphs together (all ranks or none). Returns every rank's ``(error, num_kv_blocks, wants_graphs)``."""
    want_graphs = (runner is not None and runner.device.type == "cuda" and graph_sizes != []
                   and os.environ.get("LLMC_TP_CUDA_GRAPHS") == "1" and ops.has_fast("paged_attention"))
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, (error, runner.num_kv_blocks if runner else 0, want_graphs), group=ctl)
    if any(s[0] for s in states) or not all(s[2] for s in states):
        return states
    ok, t0 = True, time.perf_counter()
    try:  # the warm-up forwards inside CudaGraphs run the collectives (NCCL init) before capture
        runner.graphs = CudaGraphs(runner, graph_sizes or default_graph_batch_sizes(runner.engine.build.max_batch_size))
        runner.graph_capture_seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any failure: everyone runs eager
        print(f"llmc: CUDA graph capture failed on this rank ({e}); running eager", file=sys.stderr)
        ok = False
    oks = [None] * dist.get_world_size()
    dist.all_gather_object(oks, ok, group=ctl)
    if not all(oks):
        runner.graphs, runner.graph_capture_seconds = None, 0.0
    return states


def _leave_group(runner: ModelRunner | None, abort: bool, timeout_s: float = 20.0) -> None:
    """Destroy (``abort``: abort, for a group with a dead or desynchronized peer) the process groups, on every
    rank at about the same time. Bounded: NCCL teardown can wait on peers, and exiting must never hang (a
    group left behind then only costs starting another engine in this process)."""
    if not dist.is_initialized():
        return
    if runner is not None:
        runner.graphs = None  # captured graphs hold NCCL resources the teardown would wait for
    cuda = runner is not None and runner.device.type == "cuda"
    fn = dist.distributed_c10d._abort_process_group if abort and cuda else dist.destroy_process_group

    def run():
        try:
            fn()
        except Exception:  # noqa: BLE001 - nothing left to do about it
            pass

    t = threading.Thread(target=run, daemon=True, name="llmc-tp-leave")
    t.start()
    t.join(timeout_s)


def _describe(rank: int, e: Exception) -> tuple[str, str]:
    """(class name if it is an LLMCError else 'RuntimeError', message) of a rank's startup failure."""
    name = type(e).__name__
    kind = name if isinstance(e, errors.LLMCError) and hasattr(errors, name) else "RuntimeError"
    return kind, f"rank {rank}: {name}: {e}"


def _exit_with_parent() -> None:
    """Leave as soon as the engine process is gone, whatever this rank is blocked in (an NCCL wait included)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="llmc-tp-parent-watch").start()


def _worker(engine_dir: str, rank: int, size: int, host: str, port: int, device: str, dtype: str | None,
            num_kv_blocks, gpu_memory_utilization: float, kv_cache_bytes, graph_sizes) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to rank 0, which stops the workers
    _exit_with_parent()
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a hard exit would leak
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    store.set(f"llmc/ready/{rank}", "1")
    ctl = _init_groups(store, rank, size, device)
    runner, error = None, None
    try:
        runner = _make_runner(load_engine(engine_dir), rank, size, device, dtype, num_kv_blocks,
                              gpu_memory_utilization, kv_cache_bytes, False)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it
        error = _describe(rank, e)
    states = _start(runner, error, ctl, graph_sizes)
    if any(s[0] for s in states):
        _leave_group(runner, abort=False)
        return
    try:
        while True:
            msg = [None]
            dist.broadcast_object_list(msg, src=0, group=ctl)
            op, payload = msg[0]
            if op == "stop":
                break
            copies, lists, logit_rows = payload
            for batch in copies:
                runner.copy_blocks(batch)
            runner.forward_lists(lists, logit_rows)
        _leave_group(runner, abort=False)
    except Exception:  # noqa: BLE001
        parent = multiprocessing.parent_process()
        if parent is not None and not parent.is_alive():
            os._exit(0)  # the engine went away mid-step: nothing to report to
        print(f"llmc: tensor-parallel worker rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # rank 0 sees the exit and fails its step


class TPExecutor:
    """Same surface as ``ModelRunner`` for the engine: forward, copy_blocks, num_kv_blocks, device, model
    (rank 0's shard), graph_capture_seconds; plus ``shutdown``. One per process (torch.distributed has one
    default group): starting a second shuts the first down."""

    def __init__(self, engine: Engine, device: str = "cpu", dtype: str | None = None,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 kv_cache_bytes: int | None = None, show_progress: bool = True,
                 cuda_graph_batch_sizes: list[int] | None = None):
        global _active
        if _active is not None:
            _active.shutdown(reason="another tensor-parallel engine was started in this process")
        if dist.is_initialized():
            raise ConfigError("torch.distributed is already initialized in this process; a tensor-parallel llmc "
                              "engine starts its own process group (run it in a process of its own)")
        size = engine.build.tp_size
        device = torch.device(device).type
        if device == "cuda" and torch.cuda.device_count() < size:
            raise ConfigError(f"engine needs {size} GPUs (--tp-size {size}); this machine has "
                              f"{torch.cuda.device_count()}")
        self.size, self.closed, self.failed = size, False, None
        self._pending_copies: list[list[tuple[int, int]]] = []  # batches, each applied at once, in order
        self._desynced = False  # a step failed on rank 0 after the workers joined it
        self.procs = []
        self.runner: ModelRunner | None = None
        host = "127.0.0.1"
        store = dist.TCPStore(host, 0, size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker, name=f"llmc-tp-rank{r}", daemon=True,
                                  args=(str(engine.path), r, size, host, store.port, device, dtype, num_kv_blocks,
                                        gpu_memory_utilization, kv_cache_bytes, cuda_graph_batch_sizes))
                      for r in range(1, size)]
        atexit.register(self.shutdown)
        _active = self
        try:
            for p in self.procs:
                p.start()
            self._wait_ready(store)
            self.ctl = _init_groups(store, 0, size, device)
            error, err0 = None, None
            try:
                self.runner = _make_runner(engine, 0, size, device, dtype, num_kv_blocks, gpu_memory_utilization,
                                           kv_cache_bytes, show_progress)
            except Exception as e:  # noqa: BLE001 - still join the handshake so the workers stop
                err0, error = e, _describe(0, e)
            states = _start(self.runner, error, self.ctl, cuda_graph_batch_sizes)
            if err0 is not None:
                raise err0
            failed = [s[0] for s in states if s[0]]
            if failed:  # a user error (e.g. a corrupt shard) keeps its LLMCError class
                kind, msg = failed[0]
                raise getattr(errors, kind, RuntimeError)(f"tensor-parallel worker failed to start: {msg}")
        except BaseException:
            self.failed = "startup failed"  # the workers may have left the control channel: no stop message
            self.shutdown()
            raise
        # Ranks may size their caches differently (free GPU memory); the scheduler uses the smallest.
        self.num_kv_blocks = min(s[1] for s in states)
        threading.Thread(target=self._watch_workers, daemon=True, name="llmc-tp-monitor").start()

    def _wait_ready(self, store) -> None:
        """Wait for every worker to reach the rendezvous, failing fast (not after a timeout) if one dies."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        keys = [f"llmc/ready/{r}" for r in range(1, self.size)]
        while not store.check(keys):
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode} "
                                   "during startup (see its output above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def _watch_workers(self) -> None:
        """A worker that dies makes rank 0's pending collective fail: gloo notices the closed socket; an NCCL
        wait would spin until its timeout, so abort the communicators."""
        by_sentinel = {p.sentinel: p for p in self.procs}
        dead = by_sentinel[wait_sentinels(list(by_sentinel))[0]]
        if self.closed:
            return
        dead.join(5)  # the sentinel fires as it exits, a moment before its exit code is known
        self.failed = f"tensor-parallel worker {dead.name} exited unexpectedly (code {dead.exitcode})"
        print(f"llmc: {self.failed}; the engine cannot continue", file=sys.stderr)
        if self.runner is not None and self.runner.device.type == "cuda":
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def __getattr__(self, name):  # device, dtype, block_size, model, graph_capture_seconds, graphs, ...
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    def _check(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"tensor-parallel engine unusable: {self.failed}")

    def forward(self, batch, logit_rows: list[int] | None = None, feed=None) -> torch.Tensor:
        """Broadcast this step's inputs, run rank 0's share; returns the full logits like ``ModelRunner``.
        ``feed`` must be None: a TP engine runs synchronous steps, so no input token is pending."""
        if feed is not None:
            raise AssertionError("tensor-parallel steps cannot take pending input tokens (no async scheduling)")
        self._check()
        lists = self.runner.prepare_lists(batch)
        copies, self._pending_copies = self._pending_copies, []
        try:
            dist.broadcast_object_list([("step", (copies, lists, logit_rows))], src=0, group=self.ctl)
            self._desynced = True
            for pairs in copies:
                self.runner.copy_blocks(pairs)
            out = self.runner.forward_lists(lists, logit_rows)
            self._desynced = False
            return out
        except Exception as e:
            if self.failed is None:
                self.failed = f"a step failed ({type(e).__name__}: {e})"
            raise RuntimeError(f"tensor-parallel step failed: {self.failed}") from e

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write block copies, applied on every rank just before the next forward (only forwards
        touch the cache), so they ride in that step's message instead of costing one of their own."""
        if pairs:
            self._pending_copies.append(list(pairs))

    def shutdown(self, reason: str = "the engine was shut down") -> None:
        """Stop the workers and leave the process group; safe to call twice, and at interpreter exit."""
        global _active
        if self.closed:
            return
        self.closed = True
        healthy = (self.failed is None and not self._desynced and "ctl" in self.__dict__
                   and all(p.is_alive() for p in self.procs))
        if self.failed is None:
            self.failed = reason
        if healthy:
            try:
                dist.broadcast_object_list([("stop", None)], src=0, group=self.ctl)
            except Exception:  # noqa: BLE001
                healthy = False
        # Leave the group *before* joining: NCCL teardown waits for the peers' teardown, which runs now.
        _leave_group(self.runner, abort=not healthy)
        for p in self.procs:
            if p.pid is None:
                continue
            p.join(timeout=30 if healthy else 1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        atexit.unregister(self.shutdown)
        if _active is self:
            _active = None
