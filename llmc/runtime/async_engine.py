"""AsyncLLMEngine: the engine for servers. One background task steps the engine; each request gets an
async iterator of delta outputs; abandoning the iterator (client gone) aborts the request.

All engine calls (add, abort, step) run on one dedicated worker thread, so the engine stays
single-threaded (no locks in the hot path) while the event loop stays free for I/O.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from llmc.errors import CapacityError, LLMCError
from llmc.runtime.engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams

log = logging.getLogger("llmc.engine")


class EngineDeadError(LLMCError):
    """The engine loop failed; the request could not be completed."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc-engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.accepting = True

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="llmc-engine-loop")

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_seconds``, abort the rest."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self._queues and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._queues):
            await self.abort(rid)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await self._call(self.engine.step)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug, not user input: fail the in-flight requests, keep serving
                log.exception("engine step failed; aborting in-flight requests")
                for rid, q in list(self._queues.items()):
                    q.put_nowait(EngineDeadError(f"internal engine error: {type(e).__name__}: {e}"))
                    await self._call(self.engine.abort_request, rid)
                self._queues.clear()
                continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
                    if out.finished:
                        del self._queues[out.request_id]
            await asyncio.sleep(0)  # let handlers run between steps

    # ------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                          prompt_token_ids: list[int] | None = None, priority: int = 0) -> asyncio.Queue:
        if not self.accepting:
            raise CapacityError("server is shutting down; retry on another replica")
        if self.max_queued_requests is not None and self.engine.scheduler.num_waiting >= self.max_queued_requests:
            raise CapacityError(f"too many queued requests ({self.max_queued_requests}); retry later")
        self.start()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        try:
            await self._call(lambda: self.engine.add_request(prompt, params, prompt_token_ids, request_id,
                                                             priority))
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        assert self._wakeup is not None
        self._wakeup.set()
        return q

    async def generate(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                       prompt_token_ids: list[int] | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs until finished; if the consumer stops early, the request is aborted."""
        q = await self.add_request(request_id, prompt, params or SamplingParams(), prompt_token_ids, priority)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> bool:
        self._queues.pop(request_id, None)
        return await self._call(self.engine.abort_request, request_id)

    async def run_sync(self, fn, *args):
        """Run ``fn`` on the engine thread (tokenize, chat template, metrics) without racing a step."""
        return await self._call(fn, *args)
