"""The HTTP router against fake backends on 127.0.0.1 (in-process uvicorn threads, no
model): routing by polled loads, health marking, retries of requests that had not
started, a clear error for streams cut after they started, pass-through of client errors,
metrics; and the `route` / `cluster` commands' user errors."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fairbatch.cli import app as cli  # noqa: E402
from fairbatch.cluster.router import RouterConfig, build_router_app  # noqa: E402
from fairbatch.cluster.router.prompt_estimate import estimate_prompt_tokens  # noqa: E402
from fairbatch.cluster.router.stream_start import event_kind  # noqa: E402
from fairbatch.server.runner import ServerThread  # noqa: E402
from support import metric, wait_for  # noqa: E402

FAST = RouterConfig(poll_interval=0.02, poll_timeout=0.5, down_poll_interval=0.05)


def fake_backend(name: str, budget: float = 10_000.0) -> FastAPI:
    """A fake OpenAI server whose behaviour the test sets in ``app.state.mode``."""
    app = FastAPI()
    app.state.mode = "ok"
    app.state.load_mode = "ok"
    app.state.budget = budget
    app.state.running = 0
    app.state.hits = 0
    app.state.closed = 0
    app.state.release = asyncio.Event()
    app.state.gate = threading.Event()   # opened by the test thread
    app.state.fail_polls = 0          # this many next /load polls answer 500
    app.state.load_auth = None        # the Authorization header of the last /load poll

    def chunk(i: int, text: str, reason=None, chat=False) -> bytes:
        if chat:
            ch = {"index": 0, "delta": {"content": text}, "finish_reason": reason}
        else:
            ch = {"index": 0, "text": text, "finish_reason": reason}
        return b"data: " + json.dumps({"id": f"{name}-{i}", "choices": [ch]}).encode() + b"\n\n"

    @app.get("/load")
    async def load(request: Request):
        app.state.load_auth = request.headers.get("authorization")
        if app.state.fail_polls > 0:
            app.state.fail_polls -= 1
            return JSONResponse({"error": "busy"}, status_code=500)
        if app.state.load_mode == "404":
            return JSONResponse({"error": "no"}, status_code=404)
        if app.state.load_mode == "fail":
            return JSONResponse({"error": "down"}, status_code=500)
        return {"running": app.state.running, "waiting": 0, "kv_usage": 0.0, "free_blocks": 100, "num_blocks": 100,
                "queued_prefill_tokens": 0, "admission_budget": app.state.budget, "time": 1.0}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": name}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        app.state.hits += 1
        app.state.request_auth = request.headers.get("authorization")
        mode = app.state.mode
        if mode == "busy":
            return JSONResponse({"error": {"message": "at capacity"}}, status_code=503, headers={"Retry-After": "1"})
        if mode == "bad":
            return JSONResponse({"error": {"message": "bad prompt", "code": 400}}, status_code=400)
        if mode == "bad_slow":        # a body the backend takes long to refuse (a large bad body)
            await asyncio.to_thread(app.state.gate.wait)
            return JSONResponse({"error": {"message": "bad prompt", "code": 400}}, status_code=400)
        n = body.get("max_tokens", 3)

        async def events():
            try:
                if chat:
                    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield b"data: " + json.dumps({"id": name, "choices": [role]}).encode() + b"\n\n"
                if mode == "hang":
                    await app.state.release.wait()
                if mode == "die_before_output":
                    raise RuntimeError("backend crashed")
                if mode == "error_first":
                    yield b'data: {"error": {"message": "engine failed", "code": 500}}\n\n'
                    return
                for i in range(n):
                    yield chunk(i, f"{name}{i} ", "length" if i == n - 1 else None, chat)
                    await asyncio.sleep(0.005)
                    if mode == "die_after_output" and i == 1:
                        raise RuntimeError("backend crashed mid-stream")
                yield b"data: [DONE]\n\n"
            finally:
                app.state.closed += 1

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        if mode in ("die_before_output", "die_after_output"):
            raise RuntimeError("backend crashed")
        return {"id": name, "choices": [{"index": 0, "text": name, "finish_reason": "length"}],
                "usage": {"completion_tokens": n}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, True)

    return app


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Cluster:
    def __init__(self, n: int, router: str = "round_robin", budgets=None, dead: int = 0, load_modes=None,
                 config: RouterConfig = FAST) -> None:
        self.apps = [fake_backend(f"b{i}", (budgets or [1e4] * n)[i]) for i in range(n)]
        for a, m in zip(self.apps, load_modes or []):
            a.state.load_mode = m
        self.servers = [ServerThread(a, log_level="critical").start() for a in self.apps]
        self.urls = [s.url for s in self.servers] + [dead_url() for _ in range(dead)]
        self.router_app = build_router_app(self.urls, router, config=config)
        self.router = ServerThread(self.router_app, log_level="critical").start()
        self.http = httpx.Client(base_url=self.router.url, timeout=20)
        self.wait_healthy(n)

    def wait_healthy(self, n: int) -> None:
        def healthy() -> bool:
            r = self.http.get("/health")
            return r.status_code == 200 and r.json()["healthy_backends"] == n
        wait_for(healthy, f"{n} healthy backends")

    def post(self, stream=True, chat=False, **body):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        payload = {"model": "fake", "max_tokens": 3, "stream": stream, **body}
        if chat:
            payload["messages"] = [{"role": "user", "content": "hello"}]
        else:
            payload.setdefault("prompt", [1, 2, 3])
        return self.http.post(path, json=payload)

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def close(self) -> None:
        self.http.close()
        self.router.stop()
        for s in self.servers:
            s.stop()


@pytest.fixture
def make_cluster():
    made = []

    def make(*a, **kw) -> Cluster:
        c = Cluster(*a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def sse(resp) -> list:
    out = []
    for block in resp.text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                d = line[6:]
                out.append(d if d == "[DONE]" else json.loads(d))
    return out


# --- helpers -------------------------------------------------------------------------------------
def test_prompt_estimate() -> None:
    assert estimate_prompt_tokens("/v1/completions", {"prompt": [1, 2, 3, 4]}) == 4
    assert estimate_prompt_tokens("/v1/completions", {"prompt": [[1, 2], [3]], "n": 2}) == 6
    assert estimate_prompt_tokens("/v1/completions", {"prompt": "x" * 400}) == 100
    assert estimate_prompt_tokens("/v1/completions", {"prompt": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens("/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "y" * 40},
                                                {"role": "user", "content": [{"type": "text", "text": "zzzz"}]}]}) == 19
    assert estimate_prompt_tokens("/v1/completions", {"prompt": None, "n": "x"}) == 1


def test_event_kinds() -> None:
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
    assert event_kind(role) == "none"
    assert event_kind(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}') == "output"
    assert event_kind(b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}') == "output"
    assert event_kind(b'data: {"error":{"message":"x"}}') == "error"
    assert event_kind(b"data: [DONE]") == "output"
    assert event_kind(b": keep-alive") == "none"


# --- routing and health ------------------------------------------------------------------------------
def test_routes_by_polled_admission_budget(make_cluster) -> None:
    c = make_cluster(2, router="admission", budgets=[50.0, 100_000.0])
    r = c.post(prompt=list(range(100)))
    assert r.status_code == 200 and r.headers["x-fairbatch-backend"] == c.urls[1]
    # the small one covers a 10-token prompt, but the big one's budget is larger
    assert c.post(prompt=[1] * 10).headers["x-fairbatch-backend"] == c.urls[1]
    info = c.http.get("/backends").json()
    assert info["router"] == "admission" and [b["healthy"] for b in info["backends"]] == [True, True]
    assert info["backends"][1]["load"]["admission_budget"] == 100_000.0
    agg = c.http.get("/load").json()
    assert agg["admission_budget"] == 100_050.0 and agg["healthy_backends"] == 2
    models = c.http.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake"
    m = c.metrics()
    assert f'fairbatch_router:requests_total{{backend="{c.urls[1]}",status="200"}} 2.0' in m
    assert "fairbatch_router:backend_admission_budget_tokens" in m and "routing_decision_seconds" in m


def test_dead_backend_is_never_used(make_cluster) -> None:
    c = make_cluster(1, router="round_robin", dead=1)
    for _ in range(4):
        r = c.post()
        assert r.status_code == 200 and r.headers["x-fairbatch-backend"] == c.urls[0]
    info = c.http.get("/backends").json()["backends"]
    assert info[1]["healthy"] is False and "poll failed" in info[1]["error"]


def test_no_healthy_backend_is_a_clear_503() -> None:
    app = build_router_app([dead_url()], "admission", config=RouterConfig(poll_interval=0.02, poll_timeout=0.5,
                                                                          max_body_bytes=1000))
    with ServerThread(app, log_level="critical") as s, httpx.Client(base_url=s.url, timeout=10) as h:
        r = h.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
        assert r.status_code == 503 and "no healthy backend" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert h.get("/health").status_code == 503
        assert h.post("/v1/completions", content=b"{nope").status_code == 400
        big = h.post("/v1/completions", json={"prompt": [1] * 1000})
        assert big.status_code == 413 and "larger than 1000 bytes" in big.json()["error"]["message"]


# --- retries of requests that had not started --------------------------------------------------------
@pytest.mark.parametrize("mode, reason", [("die_before_output", "transport"), ("error_first", "stream_error"),
                                          ("busy", "busy")])
def test_stream_that_had_not_started_is_retried_elsewhere(make_cluster, mode, reason) -> None:
    c = make_cluster(2, router="round_robin")
    c.apps[0].state.mode = mode
    for chat in (False, True):       # chat: the leading role-only event is held back
        for _ in range(2):
            r = c.post(chat=chat)
            assert r.status_code == 200
            assert r.headers["x-fairbatch-backend"] == c.urls[1]
            events = sse(r)
            assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
        c.wait_healthy(2)
    assert f'retries_total{{backend="{c.urls[0]}",reason="{reason}"}}' in c.metrics()


def test_non_streaming_request_is_retried_and_client_errors_pass_through(make_cluster) -> None:
    c = make_cluster(2, router="round_robin")
    c.apps[0].state.mode = "die_before_output"
    for _ in range(2):
        r = c.post(stream=False)
        assert r.status_code == 200 and r.json()["id"] == "b1"
    c.wait_healthy(2)
    c.apps[0].state.mode = c.apps[1].state.mode = "bad"
    hits = c.apps[0].state.hits + c.apps[1].state.hits
    r = c.post(stream=False)
    assert r.status_code == 400 and r.json()["error"]["message"] == "bad prompt"
    assert c.apps[0].state.hits + c.apps[1].state.hits == hits + 1       # not retried


def test_all_busy_answers_the_backends_503(make_cluster) -> None:
    c = make_cluster(2, router="least_requests")
    for a in c.apps:
        a.state.mode = "busy"
    r = c.post()
    assert r.status_code == 503 and r.json()["error"]["message"] == "at capacity"
    assert r.headers.get("retry-after") == "1"
    assert sum(a.state.hits for a in c.apps) == 2


def test_request_waiting_on_a_backend_that_goes_unhealthy_moves(make_cluster) -> None:
    c = make_cluster(2, router="round_robin")
    c.apps[0].state.mode = "hang"
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", c.post()), daemon=True)
    t.start()
    wait_for(lambda: c.apps[0].state.hits == 1, "the request to wait on backend 0")
    c.apps[0].state.load_mode = "fail"          # its polls fail from now on: marked down, the request moves
    t.join(30)
    r = out["r"]
    assert r.status_code == 200 and r.headers["x-fairbatch-backend"] == c.urls[1]
    assert f'retries_total{{backend="{c.urls[0]}",reason="unhealthy"}}' in c.metrics()
    # it comes back once its polls succeed again
    c.apps[0].state.load_mode = "ok"
    c.apps[0].state.mode = "ok"
    c.wait_healthy(2)


# --- a stream cut after it started -------------------------------------------------------------------
def test_stream_cut_after_it_started_ends_with_a_clear_error(make_cluster) -> None:
    c = make_cluster(2, router="round_robin")
    c.apps[0].state.mode = "die_after_output"
    r = c.post(max_tokens=5)
    assert r.status_code == 200 and r.headers["x-fairbatch-backend"] == c.urls[0]
    events = sse(r)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["b00 ", "b01 "]
    err = events[-1]["error"]
    assert "failed after the stream had started" in err["message"] and c.urls[0] in err["message"]
    assert "[DONE]" not in events
    assert c.apps[1].state.hits == 0                     # never replayed elsewhere
    assert f'midstream_failures_total{{backend="{c.urls[0]}"}} 1.0' in c.metrics()


def test_client_going_away_closes_the_backend_stream(make_cluster) -> None:
    c = make_cluster(1)
    c.apps[0].state.mode = "ok"
    with httpx.Client(base_url=c.router.url, timeout=10) as h:
        with h.stream("POST", "/v1/completions", json={"prompt": [1], "max_tokens": 400, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
    wait_for(lambda: c.apps[0].state.closed >= 1, "the backend stream to close")
    assert c.apps[0].state.closed == 1
    wait_for(lambda: c.http.get("/backends").json()["backends"][0]["inflight"] == 0, "nothing in flight")


def test_backend_without_load_endpoint_is_polled_on_health(make_cluster) -> None:
    c = make_cluster(2, router="least_requests", load_modes=["404", "ok"])
    info = c.http.get("/backends").json()["backends"]
    assert info[0]["has_load"] is False and info[0]["healthy"] is True and info[1]["has_load"] is True
    assert all(c.post().status_code == 200 for _ in range(4))
    assert c.apps[0].state.hits > 0


# --- commands: user errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["route", "--backend", "localhost:8000"], "expected a URL"),
    (["route", "--backend", "http://a:1,http://a:1"], "given twice"),
    (["route", "--backend", "http://a:1", "--router", "fastest"], "unknown router"),
    (["route", "--backend", "http://a:1", "--poll-interval", "0"], "--poll-interval"),
    (["cluster", "--model", "tiny-llama", "--replicas", "0"], "--replicas"),
    (["cluster", "--model", "tiny-llama", "--launcher", "slurm"], "unknown launcher"),
    (["cluster", "--model", "tiny-llama", "--port", "0", "--launcher", "local", "--device", "cuda"], "no GPU"),
])
def test_commands_user_errors_are_one_line(args, message, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_every_stream_is_counted_once_however_the_client_closes(make_cluster) -> None:
    """Clients that hang up the moment they read [DONE] (as benchmark clients do) are
    counted as answered; one that leaves mid-stream is a 499."""
    c = make_cluster(1)
    c.apps[0].state.mode = "ok"
    with httpx.Client(base_url=c.router.url, timeout=10) as h:
        for _ in range(20):
            with h.stream("POST", "/v1/completions", json={"prompt": [1], "max_tokens": 3, "stream": True}) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        break
        with h.stream("POST", "/v1/completions", json={"prompt": [1], "max_tokens": 400, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
    ok = f'fairbatch_router:requests_total{{backend="{c.urls[0]}",status="200"}} 20.0'
    gone = f'fairbatch_router:requests_total{{backend="{c.urls[0]}",status="499"}} 1.0'
    wait_for(lambda: ok in c.metrics() and gone in c.metrics(), "both counts")


def test_router_workers_share_the_port_and_sum_their_counters() -> None:
    """`fairbatch route --workers 3`: several processes answer on one port, /metrics on any
    of them counts every request once, and SIGTERM stops them all."""
    import os
    import signal
    import subprocess
    import sys

    servers = [ServerThread(fake_backend(f"b{i}"), log_level="critical").start() for i in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from fairbatch.cli import main; main()", "route",
                             "--backend", servers[0].url, "--backend", servers[1].url, "--port", str(port),
                             "--workers", "3", "--poll-interval", "0.02", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        # Every worker answers only once it polled every backend (the app's start-up), so
        # the first 200 from any of them is enough: none routes on an empty view after it.
        wait_for(up, "the router to come up", timeout=120)
        n = 24
        for i in range(n):
            # a new connection each time, so the kernel spreads them over the workers
            r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": [1, 2, 3], "max_tokens": 3,
                                                          "stream": i % 2 == 0}, timeout=20)
            assert r.status_code == 200, r.text
        for _ in range(6):
            text = httpx.get(url + "/metrics", timeout=5).text
            counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("fairbatch_router:requests_total{"))
            assert counted == n
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        for s in servers:
            s.stop()
    assert proc.returncode == 0, out
    assert "3 worker processes" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


# --- hardening (issue #14): health marking, final 4xx, readiness, what /backends shows, auth ----------
def test_a_few_failed_polls_do_not_mark_a_backend_down(make_cluster) -> None:
    c = make_cluster(1)
    c.apps[0].state.fail_polls = FAST.failures_to_mark_down - 1
    wait_for(lambda: c.apps[0].state.fail_polls == 0 and metric(c.metrics(), "fairbatch_router:poll_failures_total")
             >= FAST.failures_to_mark_down - 1, "the failing polls")
    assert metric(c.metrics(), "fairbatch_router:backend_marked_unhealthy_total") == 0
    assert c.post(stream=False).status_code == 200
    c.apps[0].state.fail_polls = FAST.failures_to_mark_down          # enough in a row: down, then up again
    wait_for(lambda: metric(c.metrics(), "fairbatch_router:backend_marked_unhealthy_total") == 1, "the mark")
    c.wait_healthy(1)


def test_a_4xx_from_a_stalled_backend_is_final(make_cluster) -> None:
    """A body the backend is slow to refuse (it misses polls meanwhile) gets that backend's
    400, and no other backend ever sees it."""
    c = make_cluster(3)
    for a in c.apps:
        a.state.mode = "bad_slow"
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", c.post(stream=False)), daemon=True)
    t.start()
    wait_for(lambda: sum(a.state.hits for a in c.apps) == 1, "the request to reach a backend")
    busy = next(a for a in c.apps if a.state.hits == 1)
    busy.state.fail_polls = FAST.failures_to_mark_down - 1                  # it misses polls while busy
    wait_for(lambda: busy.state.fail_polls == 0, "the missed polls")
    busy.state.gate.set()
    t.join(30)
    assert out["r"].status_code == 400 and out["r"].json()["error"]["message"] == "bad prompt"
    assert sum(a.state.hits for a in c.apps) == 1


def test_the_router_answers_only_once_every_backend_was_polled() -> None:
    servers = [ServerThread(fake_backend(f"b{i}"), log_level="critical").start() for i in range(3)]
    router = None
    try:
        router = ServerThread(build_router_app([s.url for s in servers], "round_robin", config=FAST),
                              log_level="critical").start()
        # no waiting here: uvicorn accepts only after the app's start-up, which polled every backend
        r = httpx.get(router.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["healthy_backends"] == 3
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()


def _asgi(app, fn):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return await fn(c)
    return asyncio.run(go())


def test_backends_shows_launcher_details_only_when_asked() -> None:
    meta = [{"pid": 4242, "node": "gpu-node-7", "log": "/var/log/replica-0.log", "gpus": ["0"]}]
    for details in (False, True):
        app = build_router_app(["http://127.0.0.1:9"], "round_robin",
                               config=RouterConfig(show_backend_details=details), backend_meta=meta)
        info = _asgi(app, lambda c: c.get("/backends")).json()["backends"][0]
        assert ("pid" in info and info["log"] == meta[0]["log"]) is details
        assert ("node" in info) is details


def test_router_api_key_and_host_check() -> None:
    cfg = RouterConfig(api_key="k", protect_admin=True, loopback_only=True)
    app = build_router_app(["http://127.0.0.1:9"], "round_robin", config=cfg)

    async def calls(c):
        return [(await c.post("/v1/completions", json={"prompt": "x"})).status_code,
                (await c.get("/backends")).status_code,
                (await c.get("/backends", headers={"Authorization": "Bearer k"})).status_code,
                (await c.get("/health", headers={"Host": "127.0.0.1"})).status_code,
                (await c.get("/backends", headers={"Authorization": "Bearer k", "Host": "evil.test"})).status_code]

    assert _asgi(app, calls) == [401, 401, 200, 503, 421]


def test_router_speaks_to_backends_with_the_backend_key(make_cluster) -> None:
    c = make_cluster(1, config=RouterConfig(poll_interval=0.02, poll_timeout=0.5, api_key="client-key",
                                            backend_api_key="bk"))
    wait_for(lambda: c.apps[0].state.load_auth is not None, "a poll")
    assert c.apps[0].state.load_auth == "Bearer bk"
    r = c.http.post("/v1/completions", json={"prompt": [1], "max_tokens": 2},
                    headers={"Authorization": "Bearer client-key"})
    assert r.status_code == 200 and c.apps[0].state.request_auth == "Bearer bk"


def test_prefix_router_keeps_conversations_on_their_backend_until_it_is_overloaded(make_cluster) -> None:
    """``--router prefix`` end to end: every turn of a chat (each extends the last) and every
    token-id prompt that shares a long prefix go where their prefix went, while loads are
    even; once that backend reports many more requests than the others, the next turn
    moves, and the router's /metrics shows its index and estimated hit rate."""
    c = make_cluster(3, router="prefix:balance_abs=4,balance_rel=1")

    def chat(messages):
        r = c.http.post("/v1/chat/completions", json={"model": "fake", "max_tokens": 2, "messages": messages})
        assert r.status_code == 200
        return r.headers["x-fairbatch-backend"]

    convs = {k: [{"role": "system", "content": f"you are assistant number {k}. " * 20}] for k in range(4)}
    homes: dict[int, set[str]] = {k: set() for k in convs}
    for turn in range(4):
        for k, msgs in convs.items():
            msgs.append({"role": "user", "content": f"question {turn} of conversation {k} " * 5})
            homes[k].add(chat(msgs))
            msgs.append({"role": "assistant", "content": "an answer " * 10})
    assert all(len(h) == 1 for h in homes.values()), homes

    shared = list(range(3, 3 + 512))
    where = {c.post(stream=False, prompt=shared + [7, i]).headers["x-fairbatch-backend"] for i in range(5)}
    assert len(where) == 1

    metrics = c.metrics()
    assert "fairbatch_router:backend_prefix_index_blocks" in metrics
    ratio = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("fairbatch_router:prefix_estimated_hit_ratio")))
    assert ratio > 0.5

    home = next(iter(homes[0]))
    c.apps[c.urls.index(home)].state.running = 50        # its next polls say it is far ahead
    wait_for(lambda: c.http.get("/backends").json()["backends"][c.urls.index(home)]["load"]["running"] == 50,
             "the overloaded backend's load polled")
    convs[0].append({"role": "user", "content": "one more question"})
    assert chat(convs[0]) != home
