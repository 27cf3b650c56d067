"""One HTTP request's engine requests (one per prompt; ``n`` samples share a request), merged into one
stream of ``(prompt index, delta output)``.

Whatever way the HTTP side ends (all outputs read, the consumer stops or is cancelled, an error, the
client disconnects while the request is still queued or before the response even started) every
unfinished engine request is aborted, which frees its KV blocks. A watcher task waits for the client's
``http.disconnect`` because a non-streaming response would otherwise only notice at the very end.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from fastapi import Request

from llmc.runtime.async_engine import AsyncLLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams


class ClientGone(Exception):
    """The HTTP client disconnected; nobody is left to answer."""


class Job:
    def __init__(self, engine: AsyncLLMEngine, request: Request):
        self.engine, self.request = engine, request
        self.out: asyncio.Queue = asyncio.Queue()
        self.unfinished: dict[int, str] = {}  # prompt index -> engine request id
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    async def start(self, inputs: list[tuple[str | None, list[int] | None]], params: SamplingParams,
                    priority: int = 0) -> "Job":
        """Add every prompt (validation and queue limits raise here, before any response is sent)."""
        base = uuid.uuid4().hex[:16]
        try:
            for i, (text, ids) in enumerate(inputs):
                rid = f"{base}-{i}"
                q = await self.engine.add_request(rid, text, params, ids, priority)
                self.unfinished[i] = rid
                self.tasks.append(asyncio.create_task(self._forward(i, q)))
        except BaseException:
            await self.close()
            raise
        self.tasks.append(asyncio.create_task(self._watch()))
        return self

    async def _forward(self, i: int, q: asyncio.Queue) -> None:
        while True:
            item = await q.get()
            self.out.put_nowait((i, item))
            if isinstance(item, BaseException) or item.finished:
                return

    async def _watch(self) -> None:
        try:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server's receive channel is gone too: treat as a disconnect
            pass
        self.out.put_nowait((-1, ClientGone()))
        await self.close()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self.unfinished:
                i, item = await self.out.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self.unfinished.pop(i, None)
                yield i, item
        finally:
            await self.close()

    async def close(self) -> None:
        """Abort what is unfinished. The aborts run in their own shielded task: a cancelled caller
        (anyio cancels again at every await) must not leave some of them undone."""
        if self.closed:
            return
        self.closed = True
        me = asyncio.current_task()
        for t in self.tasks:
            if t is not me:
                t.cancel()
        rids, self.unfinished = list(self.unfinished.values()), {}
        if rids:
            await asyncio.shield(asyncio.ensure_future(self._abort(rids)))

    async def _abort(self, rids: list[str]) -> None:
        for rid in rids:
            await self.engine.abort(rid)
