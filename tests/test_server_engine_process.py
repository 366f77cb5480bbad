"""The engine in its own process (what `fairbatch serve` runs): same answers as in-process,
metrics from mirrored token times, aborts free blocks there, a start-up error is one line,
and an engine that dies fails its requests and the health check without hanging anyone."""

from __future__ import annotations

import os
import signal
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from fairbatch.server.engine_process import EngineStartError, spawn_engine  # noqa: E402
from fairbatch.server.model import ServedModel  # noqa: E402
from support import wait_for  # noqa: E402

MODEL = "tiny-llama"
LOAD = dict(model=MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1, ttft_slo=5.0, tpot_slo=1.0,
            seed=3)


def spawn_server():
    info, backend = spawn_engine(LOAD, warmup=False, log_level="WARNING")
    app = build_app(ServedModel(info), backend=backend)
    return ServerThread(app).start(), app


def wait_engine_idle(http: httpx.Client) -> dict:
    def idle() -> bool:
        load = http.get("/load").json()
        return load["free_blocks"] == load["num_blocks"] and load["num_requests"] == 0 \
            and load["num_requests_in_server"] == 0
    wait_for(idle, "the engine to be idle")
    return http.get("/load").json()


@pytest.fixture(scope="module")
def server():
    s, app = spawn_server()
    s.app = app
    yield s
    s.stop()


def test_same_tokens_as_the_in_process_engine(server):
    """Greedy output of the process engine equals the in-process one on the same weights."""
    prompts = ["The quick brown fox", "Paged attention", "x"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
    remote = [client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    local_model = load_served_model(**LOAD)
    with ServerThread(build_app(local_model)) as local:
        lc = openai.OpenAI(base_url=local.url + "/v1", api_key="-", max_retries=0, timeout=60)
        here = [lc.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert remote == here


def metric(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{") or ln.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def test_streams_metrics_and_deadlines(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        wait_engine_idle(http)
        before = http.get("/metrics").text
        body = {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 7, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "slo": {"ttft_ms": 5000, "tpot_ms": 1000,
                                                                   "slo_class": "roomy"}}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"completion_tokens":7' in lines[-2]
        wait_engine_idle(http)
        after = http.get("/metrics").text
        # token times were mirrored from the engine process: TTFT and ITL histograms filled
        for name, n in (("fairbatch:time_to_first_token_seconds_count", 1), ("fairbatch:inter_token_latency_seconds_count", 6),
                        ("fairbatch:generation_tokens_total", 7)):
            assert metric(after, name) - metric(before, name) == n, name
        # a 5 s TTFT / 1 s TPOT on a tiny CPU model is met, which needs deadlines from the real arrival
        assert 'fairbatch:slo_attainment{model_name="tiny-llama",slo_class="roomy"} 1.0' in after
        assert 'fairbatch:envelope_attainment{model_name="tiny-llama",slo_class="roomy"} 1.0' in after
        assert metric(after, "fairbatch:engine_steps_total") > metric(before, "fairbatch:engine_steps_total")


def test_disconnects_free_blocks_in_the_engine_process(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"model": MODEL, "prompt": "abc" * 50, "max_tokens": 500, "ignore_eos": True, "stream": True}

        def cut() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 6:
                        return          # closes the connection mid-stream

        threads = [threading.Thread(target=cut) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        wait_engine_idle(http)


def test_engine_start_error_is_one_line():
    with pytest.raises(EngineStartError, match="unknown") as e:
        spawn_engine({**LOAD, "model": "no-such-model"}, warmup=False, log_level="WARNING")
    assert "Traceback" not in str(e.value)


def test_a_dead_engine_fails_requests_and_health():
    s, app = spawn_server()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            out: dict = {}

            def long_request() -> None:
                out["r"] = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1900,
                                                             "ignore_eos": True})

            t = threading.Thread(target=long_request)
            t.start()
            wait_for(lambda: app.state.engine.num_active == 1, "the request to be in flight")
            os.kill(app.state.engine.backend.proc.pid, signal.SIGKILL)
            t.join(30)
            assert not t.is_alive(), "the request hung after the engine died"
            assert out["r"].status_code == 500 and "engine process exited" in out["r"].json()["error"]["message"]
            h = http.get("/health")
            assert h.status_code == 503 and "engine process exited" in h.json()["error"]["message"]
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503
    finally:
        s.stop()


def test_refit_latency_learns_this_hosts_step_times():
    """--refit-latency: the engine loop feeds measured iterations to the online model, which
    tries refits; an accepted one reaches the policy and GET /profile (the shipped H100
    profile is far off a CPU's steps)."""
    info, backend = spawn_engine({**LOAD, "refit_latency": True}, warmup=False, log_level="WARNING")
    app = build_app(ServedModel(info), backend=backend)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        def one(i: int) -> None:
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(1, 40 + 7 * i)),
                                                   "max_tokens": 40, "ignore_eos": True})
            assert r.status_code == 200

        # Four waves of three concurrent requests, one wave after the other: at least 4 x 40
        # steps (a refit is tried every 50) with prefills in several of them, however fast or
        # slow (loaded) the machine is.
        for wave in range(4):
            threads = [threading.Thread(target=one, args=(3 * wave + j,)) for j in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
                assert not t.is_alive(), "a request hung"
        wait_engine_idle(http)
        text = http.get("/metrics").text
        # The loop fed its measured steps to the model, which looked at a refit window;
        # whether it accepted one depends on how noisy the steps were (a loaded machine's
        # are: then the prior stays, by design).
        assert metric(text, "fairbatch:latency_model_refit_attempts_total") >= 1
        refits = metric(text, "fairbatch:latency_model_refits_total")
        prof = http.get("/profile").json()    # the current model, as a profile the simulator loads
        if refits >= 1:
            assert prof["kind"] == "linear" and prof["meta"]["source"] == "online refit"
        from fairbatch.latency.profiles import latency_model_from_dict
        from fairbatch.plan import StepFeatures

        assert latency_model_from_dict(prof).predict(StepFeatures(1, 1, 10, 10)) > 0


def test_async_scheduling_in_the_engine_process():
    """`fairbatch serve --async-scheduling`: the engine process plans one step ahead; several
    concurrent streams (one ended by a stop string at the front end) answer as the plain
    engine does, and every block comes back. (Sarathi: plans that do not follow the clock,
    so both engines form the same batches.)"""
    def start(ahead: bool) -> ServerThread:
        info, backend = spawn_engine({**LOAD, "policy": "sarathi", "async_scheduling": ahead}, warmup=False,
                                     log_level="WARNING")
        return ServerThread(build_app(ServedModel(info), backend=backend)).start()

    server, ahead = start(False), start(True)
    try:
        prompts = ["The quick brown fox", "Paged attention", "x", "one step ahead"]

        def answers(url: str, stop: str | None = None) -> list[str]:
            client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
            out: list[str] = [""] * len(prompts)

            def one(i: int) -> None:
                stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0,
                                                   stream=True, stop=[stop] if stop and i == 1 else None,
                                                   extra_body={"ignore_eos": True})
                out[i] = "".join(c.choices[0].text for c in stream)
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out

        plain = answers(server.url)
        stop = plain[1][4:6]
        assert answers(ahead.url) == plain
        with_stop = answers(ahead.url, stop)
        assert with_stop[1] == plain[1][:plain[1].index(stop)] and with_stop[0] == plain[0]
        wait_engine_idle(httpx.Client(base_url=ahead.url))
    finally:
        ahead.stop()
        server.stop()
