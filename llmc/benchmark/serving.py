"""A streaming load generator for any OpenAI-compatible ``/v1/completions`` endpoint.

It speaks only the public API (SSE ``data:`` lines, ``[DONE]``, ``usage``), so the same client measures
``llmc serve`` and a peer (vLLM, SGLang, TensorRT-LLM's trtllm-serve) under identical load. Definitions
follow vLLM's ``benchmark_serving`` so figures are comparable:

- TTFT: request sent -> first chunk carrying a token.
- ITL: gap between consecutive token-carrying chunks.
- TPOT: (latency - TTFT) / (output tokens - 1), per request.
- goodput: completed requests per second that met every SLO given.

A failed request (HTTP error, error event mid-stream, dropped connection, timeout) is recorded with its
message and counted; it never stops the run.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from llmc.benchmark.report import summarize
from llmc.benchmark.workload import BenchRequest, arrival_offsets
from llmc.errors import ConfigError

MAX_DISTINCT_ERRORS = 20


@dataclass
class RequestResult:
    ok: bool
    start: float  # perf_counter when the request was sent
    latency: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int | None = None
    requested_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def normalize_base_url(url: str) -> str:
    """Accept ``http://host:port``, ``.../`` and ``.../v1`` alike."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _http_error(status: int, body: str) -> str:
    """The OpenAI error's message when the body is one, else the start of the body."""
    msg = body.strip()
    try:
        doc = json.loads(body)
        err = doc.get("error", doc) if isinstance(doc, dict) else doc
        if isinstance(err, dict):
            msg = str(err.get("message") or err.get("detail") or err)
        elif isinstance(err, str):
            msg = err
    except (json.JSONDecodeError, AttributeError):
        pass
    return f"HTTP {status}: {msg[:200]}" if msg else f"HTTP {status}"


async def fetch_model(session, base_url: str, headers: dict) -> str:
    """The first model the server lists, so ``--model`` is only needed on multi-model servers."""
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise ConfigError(f"could not list models at {url} ({_http_error(resp.status, body)}); pass --model")
            data = json.loads(body).get("data") or []
            if not data:
                raise ConfigError(f"{url} lists no models; pass --model")
            return data[0]["id"]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server, bad JSON: one clear line
        raise ConfigError(f"could not list models at {url} ({type(e).__name__}: {e}); is the server up? "
                          "pass --model to skip this lookup") from None


async def send_one(session, url: str, payload: dict, headers: dict, known_input_len: int | None) -> RequestResult:
    """POST one streaming completion and time every chunk; any failure becomes ``ok=False`` + message."""
    res = RequestResult(ok=False, start=time.perf_counter(), input_tokens=known_input_len,
                        requested_tokens=payload.get("max_tokens") or 0)
    last = None
    chunks = 0
    usage_tokens = None
    done = finished = False
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                res.error = _http_error(resp.status, await resp.text())
                res.latency = time.perf_counter() - res.start
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    res.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)[:200]
                    res.latency = now - res.start
                    return res
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = usage["completion_tokens"]
                    if usage.get("prompt_tokens") is not None:
                        res.input_tokens = usage["prompt_tokens"]
                for choice in chunk.get("choices") or []:
                    text = choice.get("text")
                    if text is None:  # a chat-style delta, in case the endpoint was pointed at chat
                        text = (choice.get("delta") or {}).get("content")
                    fr = choice.get("finish_reason")
                    finished = finished or fr is not None
                    # A token-carrying chunk: has text, or is not a bare terminal chunk (an empty text
                    # mid-stream is a token whose bytes are not printable yet).
                    if text or fr is None:
                        if last is None:
                            res.ttft = now - res.start
                        else:
                            res.itls.append(now - last)
                        last = now
                        chunks += 1
        res.latency = time.perf_counter() - res.start
        if not done and not finished:
            res.error = "stream ended before [DONE]"
            return res
        if res.ttft is None:
            res.error = "stream finished without a token"
            return res
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.ok = True
    except asyncio.TimeoutError:
        res.latency = time.perf_counter() - res.start
        res.error = f"timeout after {res.latency:.1f}s"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract: a failed request is counted, never fatal
        res.latency = time.perf_counter() - res.start
        res.error = f"{type(e).__name__}: {e}"[:300] or type(e).__name__
    return res


def _payload(req: BenchRequest, model: str, temperature: float, ignore_eos: bool, extra: dict | None) -> dict:
    p = {"model": model, "prompt": req.prompt if req.prompt is not None else req.prompt_token_ids,
         "max_tokens": req.output_len, "temperature": temperature, "stream": True,
         "stream_options": {"include_usage": True}}
    if ignore_eos:
        p["ignore_eos"] = True  # not OpenAI's, but vLLM/SGLang/TRT-LLM/llmc take it; exact lengths
    if extra:
        p.update(extra)
    return p


async def benchmark(base_url: str, reqs: list[BenchRequest], model: str | None = None,
                    request_rate: float = math.inf, max_concurrency: int | None = None, seed: int = 0,
                    temperature: float = 0.0, ignore_eos: bool = True, endpoint: str = "/v1/completions",
                    api_key: str | None = None, warmup: int = 1, request_timeout: float = 600.0,
                    slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                    slo_e2e_ms: float | None = None, extra_body: dict | None = None,
                    progress: bool = False) -> dict:
    """Run the workload against ``base_url`` and return the report dict (plus ``_raw`` per-request results)."""
    try:
        import aiohttp
    except ImportError:
        raise ConfigError("bench serve needs aiohttp: pip install 'llmc[bench]'") from None

    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    base_url = normalize_base_url(base_url)
    url = base_url + "/" + endpoint.lstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    offsets = arrival_offsets(len(reqs), request_rate, seed)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    # limit=0: the connection pool must not become a hidden concurrency cap (aiohttp's default is 100)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = model or await fetch_model(session, base_url, headers)
        warm = [await send_one(session, url, _payload(reqs[i % len(reqs)], model, temperature, ignore_eos,
                                                      extra_body), headers, None)
                for i in range(warmup)]
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        state = {"inflight": 0, "peak": 0}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="serve", unit="req")

        async def launch(i: int, start: float) -> RequestResult:
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = _payload(reqs[i], model, temperature, ignore_eos, extra_body)
            if sem is not None:
                await sem.acquire()
            state["inflight"] += 1
            state["peak"] = max(state["peak"], state["inflight"])
            try:
                return await send_one(session, url, payload, headers, reqs[i].input_len)
            finally:
                state["inflight"] -= 1
                if sem is not None:
                    sem.release()
                if bar is not None:
                    bar.update()

        start = time.perf_counter()
        results = await asyncio.gather(*(launch(i, start) for i in range(len(reqs))))
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    out = report(results, duration, slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)
    out["results"]["max_concurrent_requests"] = state["peak"]
    out["config"] = {"base_url": base_url, "endpoint": endpoint, "model": model, "num_requests": len(reqs),
                     "request_rate": "inf" if math.isinf(request_rate) else request_rate,
                     "max_concurrency": max_concurrency, "seed": seed, "temperature": temperature,
                     "ignore_eos": ignore_eos, "warmup": warmup,
                     "warmup_failed": sum(not w.ok for w in warm)}
    return out


def report(results: list[RequestResult], duration: float, slo_ttft_ms: float | None = None,
           slo_tpot_ms: float | None = None, slo_e2e_ms: float | None = None) -> dict:
    """Aggregate per-request results: throughput over the whole run, latency over completed requests."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown error" for r in results if not r.ok)
    top = dict(errors.most_common(MAX_DISTINCT_ERRORS))
    if len(errors) > MAX_DISTINCT_ERRORS:
        top["(other errors)"] = sum(errors.values()) - sum(top.values())
    n_out = sum(r.output_tokens for r in ok)
    n_in = sum(r.input_tokens or 0 for r in ok)
    slos = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "e2e_ms": slo_e2e_ms}
    res = {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": top, "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "incomplete_outputs": sum(r.output_tokens < r.requested_tokens for r in ok),
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": n_out / duration if duration > 0 else None,
        "total_token_throughput": (n_in + n_out) / duration if duration > 0 else None,
        "ttft_ms": summarize([r.ttft for r in ok], 1e3),
        "tpot_ms": summarize([r.tpot for r in ok if r.tpot is not None], 1e3),
        "itl_ms": summarize([x for r in ok for x in r.itls], 1e3),
        "e2el_ms": summarize([r.latency for r in ok], 1e3),
    }
    if any(v is not None for v in slos.values()):
        good = [r for r in ok if _meets(r, slos)]
        res["slo"] = {k: v for k, v in slos.items() if v is not None}
        res["good_requests"] = len(good)
        res["goodput"] = len(good) / duration if duration > 0 else None
        res["slo_attainment"] = len(good) / len(results) if results else None
    return {"mode": "serve", "results": res, "_raw": results}


def _meets(r: RequestResult, slos: dict) -> bool:
    if slos["ttft_ms"] is not None and r.ttft * 1e3 > slos["ttft_ms"]:
        return False
    if slos["tpot_ms"] is not None and r.tpot is not None and r.tpot * 1e3 > slos["tpot_ms"]:
        return False
    if slos["e2e_ms"] is not None and r.latency * 1e3 > slos["e2e_ms"]:
        return False
    return True


def run(base_url: str, reqs: list[BenchRequest], **kwargs) -> dict:
    """Synchronous entry point for the CLI."""
    return asyncio.run(benchmark(base_url, reqs, **kwargs))
