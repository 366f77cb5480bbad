"""End to end: a real uvicorn on 127.0.0.1 (free port, background thread) serving the
tiny dummy model; the official `openai` client and raw HTTP against it."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402

MODEL = "tiny-llama"


def wait_idle(app, timeout: float = 10.0) -> None:
    """Until the engine holds no request and every KV block is free."""
    model, engine = app.state.model, app.state.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (model.allocator.num_free == model.allocator.num_blocks and engine.num_active == 0
                and not model.scheduler.has_work()):
            return
        time.sleep(0.01)
    raise AssertionError(f"server not idle: {model.allocator.num_used} blocks used, "
                         f"{engine.num_active} active, {len(model.scheduler.running)} running, "
                         f"{len(model.scheduler.waiting)} waiting")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "async-scheduling"])
def server(request):
    """The whole API over the plain engine loop and over the one that plans a step ahead."""
    model = load_served_model(MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1,
                              ttft_slo=2.0, tpot_slo=0.5, async_scheduling=request.param)
    app = build_app(model)
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- the official client -------------------------------------------------------------------
def test_models_and_health(client, http):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert http.get("/health").status_code == 200
    info = http.get("/v1/models").json()["data"][0]
    assert info["max_model_len"] == 2048 and info["fairbatch"]["policy"] == "fairbatching"
    assert http.get("/profile").json()["kind"] in ("linear", "roofline")   # the scheduler's step-time model


def test_completion_non_streaming(client, server):
    r = client.completions.create(model=MODEL, prompt="Hello, world", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len("Hello, world".encode())
    assert isinstance(r.choices[0].text, str)
    wait_idle(server.app)


def test_completion_streaming_matches_non_streaming(client, server):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 10                      # one event per generated token
    assert "".join(c.choices[0].text for c in token_chunks) == full.choices[0].text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].choices == []
    wait_idle(server.app)


def test_completion_token_id_prompts_and_n(client):
    r = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5, 6, 7]], max_tokens=5, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == 7
    r = client.completions.create(model=MODEL, prompt=[10, 11, 12], max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 3
    r = client.completions.create(model=MODEL, prompt=["a", "bc"], max_tokens=2, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2


def test_completion_streaming_several_choices(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["x", "y", "z"], max_tokens=4, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    per_index: dict[int, int] = {}
    for c in chunks:
        for ch in c.choices:
            per_index[ch.index] = per_index.get(ch.index, 0) + 1
    assert per_index == {0: 4, 1: 4, 2: 4}
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_completion(client, server):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    # the plain template: "role: content\n" per message, then "assistant:"
    assert r.usage.prompt_tokens == len("system: be brief\nuser: hi there\nassistant:".encode())

    stream = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    assert stream[-1].usage.completion_tokens == 7
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]}], max_completion_tokens=3,
        extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    wait_idle(server.app)


def test_sampling_options(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=8, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True, "top_k": 50})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b                                         # same seed, same sample


def test_stop_string_and_stop_token(client, http):
    # Find what greedy decoding produces, then stop on pieces of it (single and multi-char,
    # the latter spanning two tokens: the stream must never send half of it).
    kw = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    ascii_at = [i for i in range(2, len(text) - 1) if text[i].isascii() and text[i].isprintable()
                and text[i + 1].isascii() and text[i + 1].isprintable() and text[i] not in text[:i]]
    assert ascii_at, repr(text)      # the dummy model's greedy output has printable ASCII pieces
    i = ascii_at[0]
    for stop in (text[i], text[i:i + 2]):
        r = client.completions.create(stop=[stop, "\x00never"], **kw)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == text[:text.index(stop)]
        chunks = list(client.completions.create(stop=stop, stream=True, **kw))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == r.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # stop token ids end the request with "stop" when sampled
    first_ids = http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0,
                                                   "ignore_eos": True}).json()
    assert first_ids["usage"]["completion_tokens"] == 3
    r = http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 16, "temperature": 0,
                                           "stop_token_ids": list(range(0, 512))}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1


def test_per_request_slo_counts_in_metrics(http, server):
    body = {"prompt": "slo", "max_tokens": 3, "ignore_eos": True,
            "slo": {"ttft_ms": 60000, "tpot_ms": 60000, "class": "relaxed"}}
    for _ in range(2):
        assert http.post("/v1/completions", json=body).status_code == 200
    body["slo"] = {"ttft_ms": 0.001, "tpot_ms": 0.001, "class": "impossible"}
    assert http.post("/v1/completions", json=body).status_code == 200
    text = http.get("/metrics").text
    assert 'fairbatch:slo_attainment{model_name="tiny-llama",slo_class="relaxed"} 1.0' in text
    assert 'fairbatch:slo_attainment{model_name="tiny-llama",slo_class="impossible"} 0.0' in text
    for name in ("fairbatch:num_requests_running", "fairbatch:num_requests_waiting", "fairbatch:kv_cache_usage_perc",
                 "fairbatch:num_preemptions_total", "fairbatch:time_to_first_token_seconds_bucket",
                 "fairbatch:request_time_per_output_token_seconds_bucket",
                 "fairbatch:inter_token_latency_seconds_bucket", "fairbatch:e2e_request_latency_seconds_bucket",
                 "fairbatch:envelope_attainment", "fairbatch:generation_tokens_total"):
        assert name in text, name


def test_load_endpoint(http):
    load = http.get("/load").json()
    for key in ("running", "waiting", "kv_usage", "free_blocks", "num_blocks", "queued_prefill_tokens",
                "admission_budget", "policy"):
        assert key in load
    assert load["policy"] == "fairbatching" and load["num_blocks"] == 1024


# --- errors ----------------------------------------------------------------------------------
def test_errors_are_openai_shaped(http, client):
    cases = [
        ({"model": "nope", "prompt": "x"}, 404),
        ({"prompt": "x" * 5000}, 400),                         # longer than the context
        ({"prompt": "x", "max_tokens": 4000}, 400),            # prompt + max_tokens > context
        ({"prompt": [1, 2, 99999]}, 400),                      # outside the vocabulary
        ({"prompt": []}, 400),
        ({"prompt": [[]]}, 400),
        ({"prompt": "x", "temperature": -1}, 400),
        ({"prompt": "x", "max_tokens": 0}, 400),
        ({"prompt": "x", "logprobs": 21}, 400),                 # over vLLM's max_logprobs
        ({"prompt": "x", "response_format": {"type": "json_object"}}, 400),   # refused, not ignored
        ({}, 400),
    ]
    for body, status in cases:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == status and isinstance(err["message"], str) and err["type"]
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = http.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)


def test_queue_full_answers_503_with_retry_after():
    model = load_served_model(MODEL, load_format="dummy", policy="vllm", cpu_threads=1, max_model_len=512)
    app = build_app(model, max_pending=2, retry_after=3)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r1, \
                c.stream("POST", "/v1/completions", json=body) as r2:
            assert r1.status_code == r2.status_code == 200
            r3 = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r3.status_code == 503 and r3.headers["retry-after"] == "3"
            assert r3.json()["error"]["code"] == 503
            r4 = c.post("/v1/completions", json={"prompt": [[1], [2], [3]], "max_tokens": 2})
            assert r4.status_code == 503
        # the two streams were closed early: their requests are aborted, the server accepts again
        wait_idle(app)
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        assert "fairbatch:request_rejected_total" in c.get("/metrics").text


def test_non_streaming_client_disconnect_frees_kv(server):
    app = server.app
    engine = app.state.engine
    aborted_before = app.state.metrics.request_aborted.labels(MODEL)._value.get()
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(0.5)) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post("/v1/completions", json={"prompt": [1] * 300, "max_tokens": 1700, "ignore_eos": True})
    # 1700 tokens take seconds; the abort must come long before that
    t0 = time.monotonic()
    wait_idle(app, timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert app.state.metrics.request_aborted.labels(MODEL)._value.get() >= aborted_before + 1
    assert engine.alive


@pytest.mark.parametrize("ahead", [False, True], ids=["plain", "async-scheduling"])
def test_engine_step_failure_fails_only_requests_in_flight(ahead):
    model = load_served_model(MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1,
                              async_scheduling=ahead)
    app = build_app(model)
    executor = model.instance.executor
    name = "launch" if ahead else "execute"          # what each loop calls once a step
    real = getattr(executor, name)
    calls = {"n": 0}

    def flaky(arg):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(arg)

    setattr(executor, name, flaky)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "ignore_eos": True})
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/completions", json={"prompt": "y", "max_tokens": 5, "ignore_eos": True,
                                                       "stream": True}) as st:
            events = sse_events(st)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        assert sum(1 for e in events[:-1] if e["choices"]) == 5
        wait_idle(app)
        assert app.state.engine.step_errors == 1 and c.get("/health").status_code == 200
        assert "fairbatch:engine_step_errors_total" in c.get("/metrics").text
