"""`llmc serve` as a real process on a free loopback port, driven by the official `openai` client."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "smol"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine, *extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", str(engine), "--port", str(port),
                             "--served-model-name", MODEL, "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(smol_engine):
    proc, base = start_server(smol_engine)
    yield base
    assert stop_server(proc) == 0, "server did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def disconnect_mid_stream(base: str, i: int) -> bool:
    """Start a long stream and drop the connection after a few chunks (the server must abort and free it)."""
    with httpx.stream("POST", base + "/v1/completions", json={
            "model": MODEL, "prompt": f"Tell a long story {i}", "max_tokens": 200, "stream": True,
            "ignore_eos": True}, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 3:
                return True
    return False


def wait_idle(base: str, seconds: float = 30) -> dict[str, float]:
    """The server's metrics once no request runs and no KV block is held (or after ``seconds``)."""
    deadline = time.time() + seconds
    while True:
        m = metrics(base)
        idle = m["llmc:num_requests_running"] == 0 and m["llmc:kv_cache_blocks_used"] == 0
        if idle or time.time() > deadline:
            return m
        time.sleep(0.2)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_stream_equals_plain(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert "Paris" in plain.choices[0].text
    assert streamed == plain.choices[0].text
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_equals_plain_and_usage(client, smol_engine):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_engine / "tokenizer"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    prompt_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


def test_n2_and_token_prompts(client):
    r = client.completions.create(model=MODEL, prompt=[[504, 3575, 282, 4649, 314], [19556]], max_tokens=5, n=2,
                                  temperature=0.8, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 20


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0)
    text = base.choices[0].text
    assert " 6" in text
    r = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"])
    assert r.choices[0].text == text[: text.index(" 6")] and r.choices[0].finish_reason == "stop"
    s = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=" 6", stream=True) if c.choices)
    assert s == r.choices[0].text


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_concurrent_streams_and_disconnects(client, server):
    prompts = [f"Write the number {i} in words:" for i in range(32)]

    def solo(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text

    want = [solo(p) for p in prompts[:6]]

    def stream(p):
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=p, max_tokens=10, temperature=0, stream=True) if c.choices)

    with cf.ThreadPoolExecutor(40) as ex:
        futs = [ex.submit(stream, p) for p in prompts]
        drops = [ex.submit(disconnect_mid_stream, server, i) for i in range(6)]
        got = [f.result() for f in futs]
        assert all(d.result() for d in drops)
    assert got[:6] == want
    assert all(got)
    m = wait_idle(server)
    assert m["llmc:num_requests_running"] == 0
    assert m["llmc:kv_cache_blocks_used"] == 0
    assert m["llmc:generation_tokens_total"] > 0


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, None),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": [999999999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({}, 400, "prompt"),
])
def test_bad_completion_inputs(server, client, body, status, param):
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, **body} if "model" not in body else body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices  # still serving


def test_bad_chat_and_body_inputs(server):
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard"}]})
    assert r.status_code == 400
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(server + "/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_api_key_and_queue_limit(smol_engine):
    proc, base = start_server(smol_engine, "--api-key", "sekrit", "--max-queued-requests", "0")
    try:
        r = httpx.get(base + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(base + "/v1/models", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sekrit", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        with pytest.raises(openai.RateLimitError):  # queue of 0: every request is refused with 429
            ok.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        assert stop_server(proc) == 0


def test_pipelined_server_matches_synchronous(client, smol_engine):
    """``serve --async-scheduling`` (the GPU default; the CPU default is synchronous, so the other tests here
    run synchronous steps): outputs lag the GPU by a step and a stopped sequence computes one dropped token,
    yet greedy texts, stop strings, finish reasons and usage equal the synchronous server's; concurrent
    streams with mid-stream disconnects leave no request running and no KV block held."""
    prompts = ["The capital of France is", "Count: 1, 2, 3,", "Name three colours:"]
    kw = dict(model=MODEL, max_tokens=14, temperature=0)
    want = [client.completions.create(prompt=p, **kw) for p in prompts]
    want_stop = client.completions.create(prompt="Count: 1, 2, 3,", stop=[" 5"], **kw)
    proc, base = start_server(smol_engine, "--async-scheduling")
    try:
        pc = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        for p, w in zip(prompts, want):
            got = pc.completions.create(prompt=p, **kw)
            assert got.choices[0].text == w.choices[0].text
            assert got.choices[0].finish_reason == w.choices[0].finish_reason
            assert got.usage.completion_tokens == w.usage.completion_tokens
            streamed = "".join(c.choices[0].text for c in pc.completions.create(prompt=p, stream=True, **kw)
                               if c.choices)
            assert streamed == w.choices[0].text
        got = pc.completions.create(prompt="Count: 1, 2, 3,", stop=[" 5"], **kw)
        assert got.choices[0].text == want_stop.choices[0].text and got.choices[0].finish_reason == "stop"

        def stream(i):
            return "".join(c.choices[0].text for c in pc.completions.create(
                prompt=f"Write the number {i} in words:", stream=True, **kw) if c.choices)

        with cf.ThreadPoolExecutor(24) as ex:
            texts = [ex.submit(stream, i) for i in range(16)]
            drops = [ex.submit(disconnect_mid_stream, base, i) for i in range(4)]
            assert all(t.result() for t in texts) and all(d.result() for d in drops)
        m = wait_idle(base)
        assert m["llmc:num_requests_running"] == 0 and m["llmc:kv_cache_blocks_used"] == 0
    finally:
        assert stop_server(proc) == 0


def test_tokenize_roundtrip(server):
    ids = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"


def test_openapi_fuzz_finds_no_5xx(server):
    """Random bodies for every generation endpoint (schema-shaped and not) never get a 5xx."""
    import random

    rng = random.Random(0)
    values = [None, -1, 0, 1, 2.5, 1e9, -1e9, "", "x", [], [1, -3], [[]], {}, {"a": 1}, True, "\u0000", [999999]]
    keys = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "logprobs", "seed",
            "stream", "presence_penalty", "stream_options", "min_p", "max_completion_tokens", "top_logprobs",
            "repetition_penalty", "min_tokens", "stop_token_ids"]
    schema = json.loads(httpx.get(server + "/openapi.json").text)
    assert "/v1/completions" in schema["paths"]
    for i in range(150):
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
        body = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 6))}
        if rng.random() < 0.5:
            body["prompt"] = "hi"
            body["messages"] = [{"role": "user", "content": "hi"}]
            body["max_tokens"] = rng.choice([1, 2, 3])
        body["model"] = MODEL
        r = httpx.post(server + path, json=body, timeout=60)
        assert r.status_code < 500, (path, body, r.text)


@pytest.fixture(scope="module")
def short_server(smol_ckpt, tmp_path_factory):
    """SmolLM2 built with a 96-token context: fuzzed requests (n up to 128, max_tokens unbounded) then
    finish in seconds on a CPU, so a slow generation is not mistaken for a network error."""
    from llmc.build.builder import build
    from llmc.config import BuildConfig

    eng = build(smol_ckpt, tmp_path_factory.mktemp("smol-short") / "engine",
                BuildConfig(max_batch_size=32, max_seq_len=96, max_num_tokens=128))
    proc, base = start_server(eng)
    yield base
    assert stop_server(proc) == 0, "server did not exit cleanly on SIGTERM"


def test_schemathesis_finds_no_5xx(short_server):
    """Schemathesis generates requests from /openapi.json; not_a_server_error fails on any 5xx."""
    import shutil

    server = short_server

    exe = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(exe):
        pytest.skip("schemathesis is not installed")
    r = subprocess.run([exe, "run", server + "/openapi.json", "--checks", "not_a_server_error", "--max-examples",
                        "30", "--phases", "examples,fuzzing", "--request-timeout", "60", "--seed", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "passed" in r.stdout
