"""The OpenAI-compatible HTTP app over an ``AsyncLLMEngine``.

Each HTTP request becomes a ``Job`` (one engine request per prompt, ``n`` samples sharing its prompt
blocks); responses stream as server-sent events. Errors always come back as OpenAI-style JSON with the
right status; user input never produces a 500.
"""
from __future__ import annotations

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
from llmc.runtime.async_engine import AsyncLLMEngine, EngineDeadError
from llmc.runtime.outputs import TokenLogprob
from llmc.serve.jobs import ClientGone, Job
from llmc.serve.metrics import engine_state, metrics_text
from llmc.serve.middleware import ApiKey, BodyLimit, error_json
from llmc.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                 CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                 ModelCard, ModelList, TokenizeRequest, TokenizeResponse, usage)
from llmc.serve.tokens import TokenText

log = logging.getLogger("llmc.serve")

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
STREAM_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with stream: true"}}


class ModelNotFound(LLMCError):
    pass


def _lp(v: float) -> float:
    return v if v > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = 4 << 20, grace_seconds: float = 30.0) -> FastAPI:
    llm = engine.engine
    tokenizer = llm.tokenizer
    tok = TokenText(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(grace_seconds)

    app = FastAPI(title="llmc", version="1", lifespan=lifespan, responses=ERRORS,
                  description="OpenAI-compatible completions and chat completions served by llmc.")

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return error_json(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                              "invalid_request_error")
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_json(400, f"{loc or 'body'}: {err.get('msg', 'invalid request')}", "invalid_request_error",
                          loc.split(".")[0] if loc else None)

    @app.exception_handler(RequestError)
    async def _request_error(_, exc: RequestError):
        return error_json(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(ModelNotFound)
    async def _model_not_found(_, exc: ModelNotFound):
        return error_json(404, str(exc), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(CapacityError)
    async def _capacity(_, exc: CapacityError):
        if not engine.accepting:
            return error_json(503, str(exc), "server_shutting_down", code="service_unavailable")
        return error_json(429, str(exc), "rate_limit_exceeded", code="queue_full", headers={"retry-after": "1"})

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_, exc: EngineDeadError):
        return error_json(500, str(exc), "internal_error")

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

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, api_key=api_key)  # outermost: unauthenticated bodies are not even read

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise ModelNotFound(f"the model {name!r} does not exist; this server serves {served_model_name!r}")

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        state = await engine.run_sync(engine_state, llm)
        return Response(metrics_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    card = ModelCard(id=served_model_name, max_model_len=llm.max_seq_len)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[card])

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def model(model: str):
        check_model(model)
        return card

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if req.messages is not None:
            ids = await engine.run_sync(llm.apply_chat_template, [{"role": m.role, "content": m.text()}
                                                                  for m in req.messages])
        elif req.prompt is not None:
            ids = await engine.run_sync(llm.encode, req.prompt)
        else:
            raise RequestError("give 'prompt' (a string) or 'messages'", "prompt")
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=llm.max_seq_len)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        if tokenizer is None:
            raise RequestError("this engine has no tokenizer", "tokens")
        bad = [t for t in req.tokens if t >= llm.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {llm.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=await engine.run_sync(tokenizer.decode, req.tokens))

    # ------------------------------------------------------------------ logprobs
    def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict:
        tokens, text_offset = [], []
        for it in items:
            t = tok.text(it.token_id)
            tokens.append(t)
            text_offset.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [_lp(it.logprob) for it in items],
                "top_logprobs": [{tok.text(t): _lp(lp) for t, lp in it.top} for it in items],
                "text_offset": text_offset}

    def chat_logprobs(items: list[TokenLogprob]) -> dict:
        def entry(t: int, lp: float) -> dict:
            return {"token": tok.text(t), "logprob": _lp(lp), "bytes": tok.bytes(t)}

        return {"content": [{**entry(it.token_id, it.logprob), "top_logprobs": [entry(t, lp) for t, lp in it.top]}
                            for it in items]}

    async def collect(job: Job, n: int) -> tuple[dict[int, dict], int]:
        """Read a whole job: per choice (prompt index * n + sample index) its text, token count, logprobs
        and finish reason; and the prompt tokens summed over prompts."""
        choices: dict[int, dict] = {}
        prompt_tokens: dict[int, int] = {}
        async for pi, out in job.outputs():
            prompt_tokens[pi] = len(out.prompt_token_ids)
            for c in out.outputs:
                ch = choices.setdefault(pi * n + c.index, {"text": "", "tokens": 0, "logprobs": [], "finish": None})
                ch["text"] += c.text
                ch["tokens"] += len(c.token_ids)
                ch["logprobs"].extend(c.logprobs or [])
                ch["finish"] = c.finish_reason or ch["finish"]
        return choices, sum(prompt_tokens.values())

    def empty_choice() -> dict:
        return {"text": "", "tokens": 0, "logprobs": [], "finish": None}

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions", response_model=CompletionResponse, responses=STREAM_DOC)
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        if req.echo:
            raise RequestError("echo is not supported", "echo")
        inputs = req.prompts()
        params = req.sampling_params(16 if req.max_tokens is None else req.max_tokens, req.logprobs)
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        job = await Job(engine, raw).start(inputs, params, req.priority)
        if req.stream:
            return StreamingResponse(completion_stream(job, rid, created, n, req), media_type="text/event-stream")
        try:
            choices, prompt_tokens = await collect(job, n)
        except ClientGone:
            return Response(status_code=499)
        out = []
        for k in range(len(inputs) * n):
            ch = choices.get(k) or empty_choice()
            out.append({"index": k, "text": ch["text"], "finish_reason": ch["finish"],
                        "logprobs": completion_logprobs(ch["logprobs"], 0) if req.logprobs is not None else None})
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": out, "usage": usage(prompt_tokens, sum(c["tokens"] for c in choices.values()))}

    async def completion_stream(job: Job, rid: str, created: int, n: int, req: CompletionRequest
                                ) -> AsyncIterator[str]:
        def chunk(choices, **extra):
            return sse({"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                        "choices": choices, **extra})

        offsets: dict[int, int] = {}
        completion_tokens, prompt_tokens = 0, {}
        try:
            async for pi, out in job.outputs():
                prompt_tokens[pi] = len(out.prompt_token_ids)
                for c in out.outputs:
                    k = pi * n + c.index
                    completion_tokens += len(c.token_ids)
                    want_lp = req.logprobs is not None and bool(c.logprobs)
                    # A new token is a chunk even when it adds no text yet (bytes held back, stop-string
                    # prefix, or an engine without a tokenizer): clients time TTFT and ITL per chunk.
                    if not c.text and not c.token_ids and not c.finish_reason and not want_lp:
                        continue
                    lp = completion_logprobs(c.logprobs or [], offsets.get(k, 0)) if req.logprobs is not None \
                        else None
                    offsets[k] = offsets.get(k, 0) + len(c.text)
                    yield chunk([{"index": k, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage(sum(prompt_tokens.values()), completion_tokens))
        except ClientGone:
            return
        except LLMCError as e:
            yield sse({"error": {"message": str(e), "type": "internal_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_DOC)
    async def chat(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        if not req.messages:
            raise RequestError("messages must contain at least one message", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs requires logprobs: true", "top_logprobs")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await engine.run_sync(llm.apply_chat_template, msgs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        job = await Job(engine, raw).start([(None, ids)], params, req.priority)
        if req.stream:
            return StreamingResponse(chat_stream(job, rid, created, req, n, len(ids)), media_type="text/event-stream")
        try:
            choices, _ = await collect(job, n)
        except ClientGone:
            return Response(status_code=499)
        out = []
        for k in range(n):
            ch = choices.get(k) or empty_choice()
            out.append({"index": k, "message": {"role": "assistant", "content": ch["text"]},
                        "logprobs": chat_logprobs(ch["logprobs"]) if req.logprobs else None,
                        "finish_reason": ch["finish"]})
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": out, "usage": usage(len(ids), sum(c["tokens"] for c in choices.values()))}

    async def chat_stream(job: Job, rid: str, created: int, req: ChatCompletionRequest, n: int, prompt_len: int
                          ) -> AsyncIterator[str]:
        def chunk(choices, **extra):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": served_model_name, "choices": choices, **extra})

        completion_tokens = 0
        try:
            for k in range(n):
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for _, out in job.outputs():
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    want_lp = req.logprobs and bool(c.logprobs)
                    if not c.text and not c.finish_reason and not want_lp:
                        continue
                    yield chunk([{"index": c.index, "delta": {"content": c.text} if c.text else {},
                                  "logprobs": chat_logprobs(c.logprobs or []) if req.logprobs else None,
                                  "finish_reason": c.finish_reason}])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=usage(prompt_len, completion_tokens))
        except ClientGone:
            return
        except LLMCError as e:
            yield sse({"error": {"message": str(e), "type": "internal_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    return app
