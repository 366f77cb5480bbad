"""An engine process that dies is started again, a bounded number of times (issue #14,
item 7): the stream in flight ends with a clear error, /health answers 503 while the new
engine loads and 200 once it serves, requests are served again; past the limit the
server stays down and says so. Real engine processes (tiny dummy model, CPU)."""

from __future__ import annotations

import json
import os
import signal

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.server import ServerThread, build_app  # noqa: E402
from fairbatch.server.engine_process import spawn_engine  # noqa: E402
from fairbatch.server.engine_restart import RestartingBackend  # noqa: E402
from fairbatch.server.model import ServedModel  # noqa: E402
from support import wait_for  # noqa: E402

LOAD = dict(model="tiny-llama", load_format="dummy", policy="fairbatching", cpu_threads=1, ttft_slo=5.0,
            tpot_slo=1.0, seed=3)


def spawn():
    return spawn_engine(LOAD, warmup=False, log_level="WARNING")


def health(http) -> tuple[int, str]:
    r = http.get("/health")
    return r.status_code, r.text


def test_a_dead_engine_is_restarted_a_bounded_number_of_times():
    info, first = spawn()
    backend = RestartingBackend(first, spawn, max_restarts=1)
    app = build_app(ServedModel(info), backend=backend)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=120) as http:
        assert health(http)[0] == 200
        # a stream in flight when the engine dies ends with an error event naming the cause
        with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 1900, "ignore_eos": True,
                                                          "stream": True}) as r:
            lines = r.iter_lines()
            first_line = next(ln for ln in lines if ln.startswith("data: "))
            assert "choices" in first_line
            os.kill(backend.current.proc.pid, signal.SIGKILL)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        errors = [json.loads(ln[6:]) for ln in rest if ln != "data: [DONE]" and "error" in ln]
        assert errors and "engine process exited" in errors[0]["error"]["message"]

        wait_for(lambda: backend.restarts == 1, "the restart to begin")
        code, text = health(http)
        assert code == 200 or (code == 503 and "restart" in text), text   # 503 while it loads
        wait_for(lambda: health(http)[0] == 200, "the restarted engine to serve", timeout=180)
        r = http.post("/v1/completions", json={"prompt": "again", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

        # past the limit: down for good, /health and requests say so
        os.kill(backend.current.proc.pid, signal.SIGKILL)
        wait_for(lambda: "not restarted" in health(http)[1], "/health to report the engine down for good")
        assert health(http)[0] == 503
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 503
