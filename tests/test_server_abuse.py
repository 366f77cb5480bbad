"""Abuse: fuzzed request bodies (hypothesis, shaped after the OpenAPI bodies and beyond
them) never get a 5xx and never stop the server; 200 concurrent streams with a third
of the clients hanging up mid-stream: every other request completes, and afterwards
every KV block is free. Traffic goes to 127.0.0.1 only; every loop is bounded."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from support import wait_for  # noqa: E402

MODEL = "tiny-llama"
CONTEXT = 64        # small context: any valid fuzzed request generates at most 63 tokens


def wait_idle(app) -> None:
    model, engine = app.state.model, app.state.engine
    wait_for(lambda: model.allocator.num_free == model.allocator.num_blocks and engine.num_active == 0
             and not model.scheduler.has_work(), "the server to be idle (every KV block free)")
    model.allocator.check_invariants()


@pytest.fixture(scope="module")
def server():
    model = load_served_model(MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1,
                              max_model_len=CONTEXT, max_num_seqs=256)
    app = build_app(model, max_pending=1024)
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- strategies ------------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Valid values (mostly inside the limits, sometimes just outside them), then bodies that are
# valid, valid with one or two fields replaced by arbitrary JSON, or arbitrary JSON.
token_ids = st.integers(0, 511) | st.integers(-3, 600)
prompts = (st.text(max_size=40) | st.lists(token_ids, min_size=1, max_size=30)
           | st.lists(st.text(max_size=6), min_size=1, max_size=3)
           | st.lists(st.lists(token_ids, min_size=1, max_size=8), min_size=1, max_size=3))
slo = st.fixed_dictionaries({}, optional={"ttft_ms": st.floats(-10, 1e10, allow_nan=False),
                                          "tpot_ms": st.floats(0.001, 1e4), "class": st.text(max_size=70)})
sampling_fields = {
    "model": st.sampled_from([MODEL, MODEL, "other-model"]),
    "max_tokens": st.integers(1, 30) | st.integers(-2, 80),
    "temperature": st.floats(0, 2) | st.floats(-1, 1e7, allow_nan=False),
    "top_p": st.floats(0.01, 1) | st.floats(-0.5, 1.5),
    "top_k": st.integers(-1, 600),
    "seed": st.integers(0, 2**31) | st.integers(-(2**65), 2**65),
    "n": st.integers(1, 3) | st.integers(-1, 300),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20),
    "stop_token_ids": st.lists(token_ids, max_size=4),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
    "priority": st.integers(-(2**40), 2**40),
    "slo": slo,
    "presence_penalty": st.floats(-3, 3) | st.just(0.0),
    "best_of": st.integers(0, 5),
    "user": st.text(max_size=8),
}
completion_fields = {**sampling_fields, "echo": st.booleans(), "logprobs": st.none() | st.integers(-1, 3)}
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | st.text(max_size=70),
                                 "content": st.text(max_size=30) | st.none() | st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": st.text(max_size=10)}), max_size=3)},
                                optional={"name": st.text(max_size=5)})
chat_fields = {**sampling_fields, "max_completion_tokens": st.integers(-1, 40), "logprobs": st.booleans(),
               "add_generation_prompt": st.booleans()}


def bodies(required, fields):
    valid = st.fixed_dictionaries(required, optional=fields)
    keys = sorted({*required, *fields, "tools", "response_format", "chat_template_kwargs", "suffix", "extra"})
    broken = st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values, min_size=1, max_size=2)
    mutated = st.builds(lambda a, b: {**a, **b}, valid, broken)
    return st.one_of(valid, valid, mutated, json_values)


def post(http, path: str, body) -> None:
    """Send one fuzzed body; assert the server answered sanely."""
    with http.stream("POST", path, json=body) as r:
        raw = r.read()
    assert r.status_code < 500, (path, body, r.status_code, raw[:300])
    if r.status_code != 200:
        assert "error" in json.loads(raw), raw[:300]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in raw.decode().split("\n") if ln.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", raw[-300:]
        for ln in lines[:-1]:
            assert "error" not in json.loads(ln[6:]), ln
    else:
        obj = json.loads(raw)
        assert obj["choices"] and "usage" in obj


def assert_still_serving(http, server) -> None:
    """After abuse: healthy, a plain request completes, every KV block is free again and
    no engine step failed. Each abuse test ends with this, so none depends on test order."""
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    wait_idle(server.app)
    assert server.app.state.engine.step_errors == 0


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)


def test_fuzz_completions(http, server):
    @FUZZ
    @given(body=bodies({"prompt": prompts}, completion_fields))
    def fuzz(body):
        post(http, "/v1/completions", body)

    fuzz()
    assert_still_serving(http, server)


def test_fuzz_chat(http, server):
    @FUZZ
    @given(body=bodies({"messages": st.lists(message, min_size=1, max_size=4)}, chat_fields))
    def fuzz(body):
        post(http, "/v1/chat/completions", body)

    fuzz()
    assert_still_serving(http, server)


def test_fuzz_raw_bytes(http, server):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(raw=st.binary(max_size=200),
           path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/load", "/v1/models", "/metrics",
                                 "/health", "/v1/x"]),
           ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
    def fuzz(raw, path, ctype):
        r = http.post(path, content=raw, headers={"content-type": ctype} if ctype else {})
        assert r.status_code < 500, (path, raw, r.text[:200])

    fuzz()
    assert_still_serving(http, server)


def test_pathological_bodies(http, server):
    cases = [
        b"[" * 100_000,                                       # deep nesting
        b'{"prompt": "' + b"a" * 200_000 + b'"}',             # far beyond the context
        b'{"prompt": [' + b"1," * 50_000 + b'1]}',
        b'{"prompt": "x", "max_tokens": 1e400}',
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "temperature": Infinity}',
        b'{"prompt": "x", "seed": 123456789012345678901234567890}',
        b'{"prompt": "\\ud800"}',                             # lone surrogate
        b'{"prompt": [[1, 2], "x"]}',
        b'{"prompt": "x", "n": 100000}',
        b'{"prompt": ["x", "y", "z", "w"], "n": 100}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 300}',
        b'\xff\xfe\x00',
    ]
    for raw in cases:
        r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:60], r.status_code, r.text[:200])
        assert "error" in r.json()
    assert_still_serving(http, server)


# --- many concurrent streams, a third hanging up -------------------------------------------------
N_CLIENTS = 200
MAX_TOKENS = 24


async def _stream_client(client, url: str, i: int, hang_up: bool) -> tuple[int, str | None, int]:
    body = {"model": MODEL, "prompt": [1 + (i % 90), 2, 3, 4 + (i % 7)], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7,
            "seed": i}
    tokens = 0
    usage = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return i, f"HTTP {r.status_code}", 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return i, None if usage == MAX_TOKENS and tokens == MAX_TOKENS else f"usage {usage} tokens {tokens}", tokens
            obj = json.loads(data)
            if obj.get("choices"):
                tokens += 1
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            if hang_up and tokens == 3:
                return i, "hung up", tokens          # leaves the `async with`: connection closed
    return i, "stream ended without [DONE]", tokens


def test_200_streams_a_third_disconnecting(server, http):
    app = server.app
    aborted0 = app.state.metrics.request_aborted.labels(MODEL)._value.get()

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            tasks = [_stream_client(client, server.url + "/v1/completions", i, i % 3 == 0) for i in range(N_CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*tasks), 110)

    results = asyncio.run(main())
    hung = [r for r in results if r[0] % 3 == 0]
    rest = [r for r in results if r[0] % 3 != 0]
    assert all(err == "hung up" for _, err, _ in hung)
    failures = [(i, err) for i, err, _ in rest if err is not None]
    assert not failures, failures[:5]
    assert all(n == MAX_TOKENS for _, _, n in rest)
    wait_idle(app)                                     # every KV block back, nothing running
    assert app.state.metrics.request_aborted.labels(MODEL)._value.get() - aborted0 >= len(hung) * 0.9
    assert http.get("/health").status_code == 200
    load = http.get("/load").json()
    assert load["free_blocks"] == load["num_blocks"] and load["running"] == 0 and load["waiting"] == 0


def test_oversized_body_is_413(server):
    app = build_app(server.app.state.model, max_body_bytes=1000)
    # the app is not started: the limit answers before any handler (or the engine) runs
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            big = await c.post("/v1/completions", content=b"x" * 5000, headers={"content-type": "application/json"})

            async def chunks():
                for _ in range(10):
                    yield b"y" * 500
            streamed = await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            return big, streamed

    big, streamed = asyncio.run(go())
    assert big.status_code == 413 and big.json()["error"]["code"] == 413
    assert streamed.status_code == 413
