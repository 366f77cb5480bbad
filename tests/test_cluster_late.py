"""The router and refusals (429, a backend's scheduler with ``late=reject``): a refused
request moves to the next backend the policy picks among those not tried, each backend at
most once; a 429 never marks a backend unhealthy; when every backend refused, the router
answers 429 itself (OpenAI's error format, Retry-After, the reason header); other 4xx are
final. Against fake backends, then two real CPU replicas (in-process servers on the tiny
dummy model): one whose default TTFT (1 us) no request can meet, one with a minute."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from fairbatch.cluster.router import RouterConfig, build_router_app  # noqa: E402
from fairbatch.metrics.records import REJECTED  # noqa: E402
from fairbatch.server.errors import DROPPED_REASON_HEADER, LATE_REJECT_REASON  # noqa: E402
from fairbatch.server.runner import ServerThread  # noqa: E402
from support import metric, wait_for  # noqa: E402

FAST = RouterConfig(poll_interval=0.02, poll_timeout=2.0, down_poll_interval=0.05)
HOPELESS = {"ttft_ms": 0.001}


def fake_backend(name: str, budget: float, mode: str = "ok", retry_after: str = "1") -> FastAPI:
    """An OpenAI server that serves (``ok``), refuses every request (``reject``: 429 with the
    reason header; ``reject_bare``: 429 without it) or answers another 4xx (``notfound``)."""
    app = FastAPI()
    app.state.mode = mode
    app.state.hits = 0

    @app.get("/load")
    async def load():
        return {"running": 0, "waiting": 0, "kv_usage": 0.0, "free_blocks": 100, "num_blocks": 100,
                "queued_prefill_tokens": 0, "admission_budget": budget, "time": 1.0}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.hits += 1
        if app.state.mode in ("reject", "reject_bare"):
            headers = {"Retry-After": retry_after}
            if app.state.mode == "reject":
                headers[DROPPED_REASON_HEADER] = LATE_REJECT_REASON
            return JSONResponse({"error": {"message": f"{name} refused it", "type": "RateLimitError", "param": None,
                                           "code": 429}}, status_code=429, headers=headers)
        if app.state.mode == "notfound":
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError", "param": "model",
                                           "code": 404}}, status_code=404)
        if not body.get("stream"):
            return {"id": name, "choices": [{"index": 0, "text": name, "finish_reason": "length"}]}

        async def events():
            yield b"data: " + json.dumps({"id": name, "choices": [{"index": 0, "text": name,
                                                                   "finish_reason": "length"}]}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class Fakes:
    def __init__(self, specs, router: str) -> None:
        self.apps = [fake_backend(f"b{i}", *spec) for i, spec in enumerate(specs)]
        self.servers = [ServerThread(a, log_level="critical").start() for a in self.apps]
        self.urls = [s.url for s in self.servers]
        self.router = ServerThread(build_router_app(self.urls, router, config=FAST), log_level="critical").start()
        self.http = httpx.Client(base_url=self.router.url, timeout=30)
        wait_for(lambda: self.http.get("/health").json().get("healthy_backends") == len(self.urls),
                 "the router to see every backend")

    def post(self, stream: bool, **body):
        return self.http.post("/v1/completions", json={"model": "fake", "prompt": [1, 2, 3], "max_tokens": 2,
                                                       "stream": stream, **body})

    def hits(self) -> list[int]:
        return [a.state.hits for a in self.apps]

    def healthy(self) -> list[bool]:
        return [b["healthy"] for b in self.http.get("/backends").json()["backends"]]

    def close(self) -> None:
        self.http.close()
        self.router.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture
def fakes():
    made: list[Fakes] = []

    def make(specs, router: str = "admission") -> Fakes:
        f = Fakes(specs, router)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


# --- fake backends -------------------------------------------------------------------------------------
def test_a_refusal_moves_to_the_next_backend_by_budget(fakes) -> None:
    # admission: b0 has the largest budget and refuses; next the largest of the rest, b2; b1 never
    f = fakes([(100_000.0, "reject"), (10.0, "ok"), (10_000.0, "ok")])
    for stream in (False, True):
        r = f.post(stream)
        assert r.status_code == 200 and r.headers["x-fairbatch-backend"] == f.urls[2]
        assert "b2" in r.text
    assert f.hits() == [2, 0, 2]
    assert f.healthy() == [True, True, True]                 # a refusal is no failure
    m = f.http.get("/metrics").text
    assert metric(m, "fairbatch_router:retries_total", backend=f.urls[0], reason="rejected") == 2
    assert metric(m, "fairbatch_router:backend_marked_unhealthy_total") == 0


def test_when_every_backend_refuses_the_router_answers_429(fakes) -> None:
    f = fakes([(300.0, "reject", "3"), (200.0, "reject", "2"), (100.0, "reject_bare", "5")])
    for stream in (False, True):
        r = f.post(stream)
        assert r.status_code == 429
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == 429 and err["type"] == "RateLimitError"
        assert "every backend refused" in err["message"] and all(f"b{i} refused it" in err["message"]
                                                                 for i in range(2))
        assert r.headers["retry-after"] == "2"                       # the shortest any asked for
        assert r.headers[DROPPED_REASON_HEADER] == LATE_REJECT_REASON
    assert f.hits() == [2, 2, 2]                                     # each tried once per request
    assert f.healthy() == [True, True, True]
    client = openai.OpenAI(base_url=f.router.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError, match="every backend refused"):
        client.completions.create(model="fake", prompt="hi", max_tokens=2)
    m = f.http.get("/metrics").text
    assert metric(m, "fairbatch_router:requests_total", backend="none", status="429") == 3
    # refusals without a reason of their own: the router names one
    for a in f.apps:
        a.state.mode = "reject_bare"
    r = f.post(False)
    assert r.status_code == 429 and r.headers[DROPPED_REASON_HEADER] == "rejected-saturated"


def test_other_client_errors_are_final(fakes) -> None:
    f = fakes([(100_000.0, "notfound"), (10.0, "ok")])
    r = f.post(False)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such model"
    assert f.hits() == [1, 0]
    # one backend refuses, the other sends a 404: the 404 is the answer, not a 429
    f.apps[0].state.mode = "reject"
    f.apps[1].state.mode = "notfound"
    r = f.post(True)
    assert r.status_code == 404 and f.hits() == [2, 1]


# --- two real CPU replicas ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replicas():
    pytest.importorskip("torch")
    from fairbatch.server import build_app, load_served_model

    apps = []
    for ttft in (1e-6, 60.0):   # replica 0 refuses whatever carries no SLO of its own
        model = load_served_model("tiny-llama", load_format="dummy", policy="fairbatching", cpu_threads=1,
                                  ttft_slo=ttft, tpot_slo=5.0, max_model_len=512,
                                  scheduler_options={"late": "reject"})
        apps.append(build_app(model))
    servers = [ServerThread(a).start() for a in apps]
    urls = [s.url for s in servers]
    router = ServerThread(build_router_app(urls, "round_robin", config=FAST), log_level="critical").start()
    http = httpx.Client(base_url=router.url, timeout=60)
    try:
        wait_for(lambda: http.get("/health").json().get("healthy_backends") == 2, "both replicas healthy")
        yield router, urls, http
    finally:
        http.close()
        router.stop()
        for s in servers:
            s.stop()


def test_real_replicas_refused_on_one_served_on_the_other(replicas) -> None:
    router, urls, http = replicas
    before = httpx.get(urls[0] + "/metrics").text
    # round robin tries replica 0 first every time: it refuses, replica 1 serves
    for stream in (False, True):
        r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "ignore_eos": True,
                                               "stream": stream})
        assert r.status_code == 200 and r.headers["x-fairbatch-backend"] == urls[1], r.text[:300]
        if stream:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
        else:
            assert r.json()["usage"]["completion_tokens"] == 3
    after = httpx.get(urls[0] + "/metrics").text
    name = "fairbatch:request_rejected_total"
    assert metric(after, name, reason="late") == metric(before, name, reason="late") + 2
    m = http.get("/metrics").text
    assert metric(m, "fairbatch_router:retries_total", backend=urls[0], reason="rejected") >= 2
    assert [b["healthy"] for b in http.get("/backends").json()["backends"]] == [True, True]
    assert metric(m, "fairbatch_router:backend_marked_unhealthy_total") == 0


def test_real_replicas_both_refusing(replicas) -> None:
    router, urls, http = replicas
    for stream in (False, True):
        r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "stream": stream,
                                               "slo": HOPELESS})
        assert r.status_code == 429, r.text[:300]
        assert r.headers[DROPPED_REASON_HEADER] == LATE_REJECT_REASON and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == 429 and all(u in err["message"] for u in urls)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, extra_body={"slo": HOPELESS})
    assert LATE_REJECT_REASON in str(e.value)
    # a bad request is final: one backend sees it, no retry
    m0 = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 100_000})
    assert r.status_code == 400
    m1 = http.get("/metrics").text
    retries = "fairbatch_router:retries_total"
    assert metric(m1, retries) == metric(m0, retries)
    assert [b["healthy"] for b in http.get("/backends").json()["backends"]] == [True, True]


def test_bench_through_the_router_counts_refusals(replicas, tmp_path) -> None:
    from fairbatch.bench.run import BenchConfig, prepare, run_once

    _, _, http = replicas
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    lines += [f"{0.01 * i:.3f},{10 + i},{2 + i % 3}" for i in range(16)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    cfg = BenchConfig(base_url=str(http.base_url).rstrip("/"), trace=str(tmp_path / "t.csv"), num_prompts=None,
                      timeout=120.0, slo_classes="hopeless:0.000001:5:0.5,loose:600:5:0.5")
    wl = prepare(cfg)
    doomed = sum(r.slo.name == "hopeless" for r in wl.requests)
    out = run_once(cfg, wl)
    s = out.summary
    assert 0 < doomed < len(wl.requests)
    assert s["rejected"] == doomed and s["completed"] == len(wl.requests) - doomed, s["failure_reasons"]
    assert s["failure_reasons"] == {REJECTED: doomed}
    assert s["server_relegated"] is None            # the router's /metrics has no such count
