"""The OpenAI-compatible HTTP app over an ``AsyncLLMEngine``.

Every request becomes one engine request per prompt (``n`` samples share its prompt blocks); responses
stream as server-sent events. A client that goes away cancels the response generator, which aborts its
engine requests and frees their KV blocks. Errors always come back as OpenAI-style JSON.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmc.errors import CapacityError, LLMCError, RequestError
from llmc.runtime.async_engine import AsyncLLMEngine
from llmc.runtime.outputs import RequestOutput, TokenLogprob
from llmc.serve.metrics import metrics_text
from llmc.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, usage

log = logging.getLogger("llmc.serve")


def error_json(status: int, message: str, type_: str, param: str | None = None, code: Any = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = error_json(413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                             code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = 4 << 20, grace_seconds: float = 30.0) -> FastAPI:
    llm = engine.engine
    tokenizer = llm.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(grace_seconds)

    app = FastAPI(title="llmc", version="1", lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})

    # ------------------------------------------------------------------ errors and auth
    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_json(400, f"{loc or 'body'}: {err.get('msg', 'invalid request')}", "invalid_request_error",
                          loc)

    @app.exception_handler(RequestError)
    async def _request_error(_, exc: RequestError):
        return error_json(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(CapacityError)
    async def _capacity(_, exc: CapacityError):
        status = 503 if not engine.accepting else 429
        return error_json(status, str(exc), "server_overloaded" if status == 503 else "rate_limit_exceeded")

    @app.exception_handler(LLMCError)
    async def _llmc_error(_, exc: LLMCError):
        return error_json(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("internal error")
        return error_json(500, f"internal server error ({type(exc).__name__})", "internal_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_json(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise StarletteHTTPException(404, f"model {name!r} does not exist; this server serves "
                                              f"{served_model_name!r}")

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(metrics_text(llm), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "llmc", "max_model_len": llm.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(body: dict):
        if tokenizer is None:
            raise RequestError("this engine has no tokenizer", "prompt")
        if "messages" in body:
            ids = await engine.run_sync(llm.apply_chat_template, body["messages"])
        elif isinstance(body.get("prompt"), str):
            ids = await engine.run_sync(llm.encode, body["prompt"])
        else:
            raise RequestError("give 'prompt' (a string) or 'messages'", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: dict):
        toks = body.get("tokens")
        if tokenizer is None or not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            raise RequestError("give 'tokens', a list of token ids", "tokens")
        bad = [t for t in toks if not 0 <= t < llm.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary", "tokens")
        return {"prompt": await engine.run_sync(tokenizer.decode, toks)}

    # ------------------------------------------------------------------ generation
    def token_text(tok: int) -> str:
        return tokenizer.decode([tok]) if tokenizer is not None else str(tok)

    async def start_requests(inputs: list[tuple[str | None, list[int] | None]], params, priority: int
                             ) -> list[tuple[str, asyncio.Queue]]:
        """Add one engine request per prompt; all are validated (or all aborted) before any output flows."""
        base = uuid.uuid4().hex[:16]
        handles: list[tuple[str, asyncio.Queue]] = []
        try:
            for i, (text, ids) in enumerate(inputs):
                rid = f"{base}-{i}"
                handles.append((rid, await engine.add_request(rid, text, params, ids, priority)))
        except BaseException:
            for rid, _ in handles:
                await engine.abort(rid)
            raise
        return handles

    async def merge(handles: list[tuple[str, asyncio.Queue]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Delta outputs of several engine requests as they come; on exit (client gone, error) every
        unfinished one is aborted, which frees its KV blocks."""
        pending = {i: q for i, (_, q) in enumerate(handles)}
        getters: dict[asyncio.Task, int] = {}
        try:
            while pending:
                for i, q in pending.items():
                    if i not in getters.values():
                        getters[asyncio.create_task(q.get())] = i
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    i = getters.pop(t)
                    item = t.result()
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        pending.pop(i)
                    yield i, item
        finally:
            for t in getters:
                t.cancel()
            for i in list(pending):
                await asyncio.shield(engine.abort(handles[i][0]))

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        inputs = req.prompts()
        params = req.sampling_params(16 if req.max_tokens is None else req.max_tokens, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = params.n
        stream = merge(await start_requests(inputs, params, req.priority))
        if req.stream:
            return StreamingResponse(_completion_stream(stream, rid, created, n, req),
                                     media_type="text/event-stream")
        texts, toks, lps, reasons, prompt_tokens = {}, {}, {}, {}, {}
        async for pi, out in stream:
            prompt_tokens[pi] = len(out.prompt_token_ids)
            for c in out.outputs:
                k = pi * n + c.index
                texts[k] = texts.get(k, "") + c.text
                toks.setdefault(k, []).extend(c.token_ids)
                lps.setdefault(k, []).extend(c.logprobs or [])
                if c.finish_reason:
                    reasons[k] = c.finish_reason
        choices = [{"index": k, "text": texts.get(k, ""), "finish_reason": reasons.get(k),
                    "logprobs": completion_logprobs(lps.get(k, []), 0) if req.logprobs is not None else None}
                   for k in range(len(inputs) * n)]
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": choices,
                "usage": usage(sum(prompt_tokens.values()), sum(len(t) for t in toks.values()))}

    async def _completion_stream(stream, rid, created, n, req: CompletionRequest):
        offsets: dict[int, int] = {}
        completion_tokens, prompt_tokens = 0, {}
        try:
            async for pi, out in stream:
                prompt_tokens[pi] = len(out.prompt_token_ids)
                for c in out.outputs:
                    k = pi * n + c.index
                    completion_tokens += len(c.token_ids)
                    lp = None
                    if req.logprobs is not None:
                        lp = completion_logprobs(c.logprobs or [], offsets.get(k, 0))
                    offsets[k] = offsets.get(k, 0) + len(c.text)
                    if not c.text and not c.finish_reason and not c.token_ids:
                        continue
                    yield sse({"id": rid, "object": "text_completion", "created": created,
                               "model": served_model_name,
                               "choices": [{"index": k, "text": c.text, "logprobs": lp,
                                            "finish_reason": c.finish_reason}]})
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                           "choices": [], "usage": usage(sum(prompt_tokens.values()), completion_tokens)})
        except LLMCError as e:
            yield sse({"error": {"message": str(e), "type": "internal_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict:
        tokens, text_offset = [], []
        for it in items:
            t = token_text(it.token_id)
            tokens.append(t)
            text_offset.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [it.logprob for it in items],
                "top_logprobs": [{token_text(t): lp for t, lp in it.top} for it in items],
                "text_offset": text_offset}

    def chat_logprobs(items: list[TokenLogprob]) -> dict:
        def entry(tok: int, lp: float) -> dict:
            t = token_text(tok)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**entry(it.token_id, it.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in it.top]} for it in items]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        if not req.messages:
            raise RequestError("messages must contain at least one message", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await engine.run_sync(llm.apply_chat_template, msgs)
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs requires logprobs: true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, llm.max_seq_len - len(ids))
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        stream = merge(await start_requests([(None, ids)], params, req.priority))
        if req.stream:
            return StreamingResponse(_chat_stream(stream, rid, created, req, n, len(ids)),
                                     media_type="text/event-stream")
        texts, toks, lps, reasons = {}, {}, {}, {}
        async for _, out in stream:
            for c in out.outputs:
                texts[c.index] = texts.get(c.index, "") + c.text
                toks.setdefault(c.index, []).extend(c.token_ids)
                lps.setdefault(c.index, []).extend(c.logprobs or [])
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        choices = [{"index": k, "message": {"role": "assistant", "content": texts.get(k, "")},
                    "logprobs": chat_logprobs(lps.get(k, [])) if req.logprobs else None,
                    "finish_reason": reasons.get(k)} for k in range(n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": usage(len(ids), sum(len(t) for t in toks.values()))}

    async def _chat_stream(stream, rid, created, req: ChatCompletionRequest, n: int, prompt_len: int):
        def chunk(choices, **extra):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": served_model_name, "choices": choices, **extra})

        completion_tokens = 0
        try:
            for k in range(n):
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for _, out in stream:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    if not c.text and not c.finish_reason and not c.token_ids:
                        continue
                    yield chunk([{"index": c.index, "delta": {"content": c.text} if c.text else {},
                                  "logprobs": chat_logprobs(c.logprobs or []) if req.logprobs else None,
                                  "finish_reason": c.finish_reason}])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage(prompt_len, completion_tokens))
        except LLMCError as e:
            yield sse({"error": {"message": str(e), "type": "internal_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    return app
