"""Real processes on 127.0.0.1: two CPU replicas of `fairbatch serve` (tiny dummy model)
behind `fairbatch route`; a bench run through it; one replica killed mid-run loses no
request that had not started and the run finishes on the other. Then `fairbatch cluster`
(Ray, and plain local processes) with two CPU replicas, a short bench, a clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.bench.run import BenchConfig, prepare, run_once  # noqa: E402
from fairbatch.cluster.launcher import ReplicaProcess, free_port  # noqa: E402

FAIRBATCH = [sys.executable, "-c", "from fairbatch.cli import main; main()"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
SERVE = ["--model", "tiny-llama", "--load-format", "dummy", "--cpu-threads", "1", "--log-level", "warning",
         "--ttft-slo", "2", "--tpot-slo", "0.5"]


def write_trace(path: Path, n: int, rate: float, out_lo: int, out_hi: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    lines += [f"{a:.4f},{p},{o}" for a, p, o in zip(arrivals, rng.integers(4, 100, n), rng.integers(out_lo, out_hi, n))]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def bench(url: str, trace: Path, n: int, on_done=None):
    cfg = BenchConfig(base_url=url, trace=str(trace), num_prompts=n, ttft_slo=2.0, tpot_slo=0.5, timeout=120.0)
    wl = prepare(cfg)
    return run_once(cfg, wl, 1.0, on_done)


def router_metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(f"fairbatch_router:{name}{{") and not line.startswith(f"fairbatch_router:{name} "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Two replicas started in parallel, and `fairbatch route` in front of them."""
    logs = tmp_path_factory.mktemp("logs")
    reps = [ReplicaProcess(SERVE, log_dir=str(logs), name=f"replica-{i}") for i in range(2)]
    errors: list[BaseException] = []

    def start(r: ReplicaProcess) -> None:
        try:
            r.start(timeout=120)
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start, args=(r,)) for r in reps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    port = free_port("127.0.0.1")
    router = None
    try:
        assert not errors, errors
        router = subprocess.Popen(FAIRBATCH + ["route", "--backend", reps[0].url, "--backend", reps[1].url,
                                               "--router", "admission", "--port", str(port), "--poll-interval",
                                               "0.05", "--log-level", "warning"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health", timeout=2).json().get("healthy_backends") == 2, 60,
                 "the router to see both replicas")
        yield url, reps, router
    finally:
        if router is not None:
            router.send_signal(signal.SIGTERM)
            try:
                router.wait(20)
            except subprocess.TimeoutExpired:
                router.kill()
        for r in reps:
            r.stop(10)


def test_bench_through_the_router(routed, tmp_path) -> None:
    url, reps, _ = routed
    trace = write_trace(tmp_path / "t.csv", 40, 25.0, 5, 40, seed=1)
    out = bench(url, trace, 40)
    s = out.summary
    assert s["completed"] == 40 and s["failed"] == 0, s.get("failure_reasons")
    for r in reps:        # both replicas served part of it
        assert router_metric(url, "requests_total", backend=r.url, status="200") > 0


def test_killing_a_replica_mid_run_loses_no_unstarted_request(routed, tmp_path) -> None:
    url, reps, _ = routed
    n = 80
    trace = write_trace(tmp_path / "t.csv", n, 25.0, 40, 120, seed=2)
    done = []
    killed_at = []

    def on_done(rec) -> None:
        done.append(rec)
        if len(done) == 15 and not killed_at:
            reps[1].kill()              # SIGKILL: connections reset, no goodbye
            killed_at.append(time.perf_counter())

    out = bench(url, trace, n, on_done)
    assert killed_at, "the replica was never killed"
    recs = out.records
    failed = [r for r in recs if not r.success]
    assert len(recs) == n
    # every failure is a stream that had started on the killed replica, with a clear reason
    for r in failed:
        assert r.first_token_time is not None, r.error
        assert "failed after the stream had started" in r.error and reps[1].url in r.error, r.error
    assert len(failed) == router_metric(url, "midstream_failures_total", backend=reps[1].url)
    assert len(failed) < n - 15
    # what came after the kill finished on the other replica
    later = [r for r in recs if r.arrival > killed_at[0]]     # could not have started on the dead replica
    assert later and all(r.success for r in later)
    # the killed replica is down; the other one may miss a poll on a loaded machine, but a
    # backend is marked down only after several in a row, and comes back: wait, don't sample
    wait_for(lambda: [b["healthy"] for b in httpx.get(url + "/backends", timeout=10).json()["backends"]]
             == [True, False], 120, "the live replica healthy and the killed one down")


# --- `fairbatch cluster` -----------------------------------------------------------------------------
def _read_lines(proc: subprocess.Popen, sink: list[str]) -> None:
    for line in proc.stdout:          # type: ignore[union-attr]
        sink.append(line)


@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_cluster_two_cpu_replicas_bench_and_clean_shutdown(launcher, tmp_path) -> None:
    if launcher == "ray":
        pytest.importorskip("ray")
    port = free_port("127.0.0.1")
    cmd = FAIRBATCH + ["cluster", "--replicas", "2", "--launcher", launcher, "--port", str(port),
                       "--log-dir", str(tmp_path / "logs"), "--poll-interval", "0.05", "--log-level", "warning",
                       "--router", "least_requests", "--backend-details", *SERVE]   # pids in /backends
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        wait_for(lambda: any("routing over 2 replica(s)" in x for x in lines) or proc.poll() is not None, 150,
                 "the cluster to start")
        assert proc.poll() is None, "".join(lines)
        wait_for(lambda: httpx.get(url + "/health", timeout=10).json().get("healthy_backends") == 2, 120,
                 "both replicas healthy")
        backends = httpx.get(url + "/backends", timeout=5).json()["backends"]
        pids = [b["pid"] for b in backends]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert len(re.findall(r"replica \d: http://127\.0\.0\.1:\d+", "".join(lines))) == 2
        out = bench(url, write_trace(tmp_path / "t.csv", 20, 20.0, 5, 30, seed=3), 20)
        assert out.summary["completed"] == 20 and out.summary["failed"] == 0, out.summary.get("failure_reasons")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
        reader.join(5)
        text = "".join(lines)
        assert rc == 0, text
        assert "stopped" in text and "Traceback" not in text, text
        wait_for(lambda: not any(alive(p) for p in pids), 10, "the replicas to exit")
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
