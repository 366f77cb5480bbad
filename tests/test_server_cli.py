"""`fairbatch serve` as a user runs it: a subprocess on 127.0.0.1, a free port, stopped
with SIGTERM; user errors are one line and exit status 2."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

FAIRBATCH = [sys.executable, "-m", "fairbatch.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def test_serve_subprocess_answers_and_stops_cleanly():
    proc = subprocess.Popen(FAIRBATCH + ["serve", "--model", "tiny-qwen3", "--load-format", "dummy", "--port", "0",
                                         "--policy", "sarathi", "--cpu-threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        url = None
        deadline = time.monotonic() + 90
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
        assert url, "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(200):           # the banner prints just before uvicorn starts listening
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            r = c.post("/v1/completions", json={"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 5,
                                                "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
            assert c.get("/load").json()["policy"] == "sarathi"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rest = proc.stdout.read()
    # uvicorn re-raises the signal it stopped on after a graceful shutdown
    assert proc.returncode in (0, -signal.SIGTERM), rest
    assert "Traceback" not in rest and "ERROR" not in rest, rest


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model", "--load-format", "dummy", "--port", "0"], "unknown"),
    (["--model", "tiny-llama", "--load-format", "dummy", "--port", "0", "--policy", "nope"], "unknown policy"),
    (["--model", "tiny-llama", "--load-format", "dummy", "--port", "0", "--max-pending", "0"], "--max-pending"),
    (["--model", "/no/such/dir", "--port", "0"], "not found"),
    (["--model", "tiny-llama", "--load-format", "dummy", "--port", "0", "--prefill-attention", "flash"],
     "unknown prefill attention"),
])
def test_serve_user_errors(args, message):
    from typer.testing import CliRunner

    from fairbatch.cli import app

    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_serve_busy_port_is_one_line():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    from typer.testing import CliRunner

    from fairbatch.cli import app

    try:
        port = s.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--model", "tiny-llama", "--load-format", "dummy", "--port", str(port)])
    finally:
        s.close()
    assert r.exit_code == 2 and "cannot listen" in r.output


@pytest.mark.parametrize("flag, expected", [
    ([], (False, False, "triton", False)), (["--piecewise-cuda-graphs"], (True, False, "triton", False)),
    (["--no-piecewise-cuda-graphs"], (False, False, "triton", False)),
    (["--attention-overlap", "--prefill-attention", "sdpa"], (False, True, "sdpa", False)),
    (["--async-scheduling"], (False, False, "triton", True))])
def test_serve_engine_flags_reach_engine_args(monkeypatch, flag, expected):
    """The experimental engine flags (piecewise graphs, attention overlap, SDPA prefill,
    async scheduling) are
    off by default and reach the engine's EngineArgs (on the CPU they change nothing else,
    so the engine is stopped once its arguments are built)."""
    from typer.testing import CliRunner

    import fairbatch.engine
    from fairbatch.cli import app
    from fairbatch.engine.llm import EngineArgs

    seen: list[EngineArgs] = []

    class ArgsOnly:
        def __init__(self, model, *, policy, scheduler_config, latency_model, **engine_kwargs):
            seen.append(EngineArgs(model, **engine_kwargs))
            raise ValueError("engine arguments seen")

    monkeypatch.setattr(fairbatch.engine, "LLM", ArgsOnly)
    r = CliRunner().invoke(app, ["serve", "--model", "tiny-llama", "--load-format", "dummy", "--port", "0",
                                 "--engine-thread", *flag])
    assert r.exit_code == 2 and "engine arguments seen" in r.output, r.output
    assert [(a.piecewise_cuda_graphs, a.attention_overlap, a.prefill_attention, a.async_scheduling)
            for a in seen] == [expected]
