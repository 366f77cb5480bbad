"""Late requests (``SchedulerConfig.late``) through the serving stack: the engine loop
reports both kinds of refusal, the API answers 429 (OpenAI's error format, Retry-After,
the reason header) before any stream starts, /metrics counts refusals and relegations,
`fairbatch serve --late reject` under a burst, the offline ``LLM``, and `fairbatch bench`.

A request is made hopeless deterministically with a per-request TTFT of 1 us: the engine
adds it at least one hand-off after the HTTP handler stamped its arrival, so its deadline
has passed before any prefill could start, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fairbatch.instance import Instance  # noqa: E402
from fairbatch.kv import BlockAllocator  # noqa: E402
from fairbatch.latency.linear import LinearLatencyModel  # noqa: E402
from fairbatch.metrics.records import REJECTED  # noqa: E402
from fairbatch.request import SLO, Request, RequestState  # noqa: E402
from fairbatch.scheduler import SchedulerConfig, make_scheduler  # noqa: E402
from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from fairbatch.server.engine_loop import REJECTED as DELTA_REJECTED  # noqa: E402
from fairbatch.server.engine_loop import Delta, EngineLoop, mirror  # noqa: E402
from fairbatch.server.engine_messages import AddRequests, LateCounts, StepDeltas  # noqa: E402
from fairbatch.server.errors import DROPPED_REASON_HEADER, LATE_REJECT_REASON  # noqa: E402
from fairbatch.sim import SimExecutor  # noqa: E402
from support import metric, wait_for  # noqa: E402

MODEL = "tiny-llama"
HOPELESS = {"ttft_ms": 0.001}              # 1 us: refused at arrival under late=reject
LOOSE = {"ttft_ms": 600_000, "tpot_ms": 60_000}
SIM = LinearLatencyModel(a=0.010, b=1e-4)   # 10 ms per step + 0.1 ms per token


def idle(app) -> bool:
    model, engine = app.state.model, app.state.engine
    return (model.allocator.num_free == model.allocator.num_blocks and engine.num_active == 0
            and not model.scheduler.has_work())


# --- the engine loop (simulated executor, explicit clock) ----------------------------------------
def _loop(late: str, **cfg):
    sched = make_scheduler("vllm", SchedulerConfig(max_model_len=8192, max_num_batched_tokens=256, late=late, **cfg),
                           BlockAllocator(1000), SIM)
    posted: list = []
    return EngineLoop(Instance(sched, SimExecutor(SIM)), posted.append), posted


def _deltas(posted) -> dict[str, Delta]:
    return {rid: d for m in posted if isinstance(m, StepDeltas) for rid, d in m.deltas}


def test_engine_loop_reports_refusals_at_arrival_and_in_the_queue() -> None:
    loop, posted = _loop("reject")
    sched = loop.instance.scheduler
    # 4,000 prompt tokens take 0.41 s alone: a 0.3 s TTFT is hopeless on arrival
    hopeless = Request("hopeless", 0.0, 4000, 5, SLO(0.3, 0.05))
    # 2,000 tokens alone: 0.21 s < 0.25 s, so it is admitted; in 256-token chunks it needs
    # ~0.28 s, and it is refused part-way through its prefill
    slow = Request("slow", 0.0, 2000, 5, SLO(0.25, 0.05))
    ok = Request("ok", 0.0, 16, 3, SLO(60.0, 1.0))
    loop.apply([AddRequests((hopeless, slow, ok))], 0.0)
    first = posted.index(LateCounts(1, 0))
    assert posted[first + 1] == StepDeltas((("hopeless", Delta([], DELTA_REJECTED, time=0.0)),))
    assert hopeless.state is RequestState.REJECTED and "hopeless" not in loop._sent
    now = 0.0
    while sched.has_work():
        before = loop.step_seconds
        loop.step(now)
        now += loop.step_seconds - before
    got = _deltas(posted)
    assert got["slow"].rejected and got["slow"].token_ids == [] and got["slow"].finish_reason == "rejected"
    assert slow.state is RequestState.REJECTED and slow.generated == 0
    assert got["ok"].finish_reason == "length" and ok.generated == 3
    assert loop._sent == {} and sched.allocator.num_free == sched.allocator.num_blocks
    # the counts go out before the delta that follows them, and in the snapshot
    kinds = [type(m) for m in posted]
    assert LateCounts(2, 0) in posted
    assert kinds.index(StepDeltas, posted.index(LateCounts(2, 0))) > posted.index(LateCounts(2, 0))
    loop.publish_snapshot(now)
    snap = posted[-1].snapshot
    assert snap.rejected == 2 and snap.relegated == 0
    # the front end's copy (engine in another process) learns the request's state
    copy = Request("slow", 0.0, 2000, 5, SLO(0.25, 0.05))
    mirror(copy, got["slow"])
    assert copy.state is RequestState.REJECTED and copy.finish_reason == "rejected"


def test_engine_loop_drops_relegated_requests_too() -> None:
    loop, posted = _loop("relegate")
    sched = loop.instance.scheduler
    late = Request("late", 0.0, 4000, 5, SLO(0.3, 0.05))
    loop.apply([AddRequests((late,))], 0.0)
    assert late.relegated and list(sched.relegated) == [late] and sched.stats.relegated == 1
    loop.drop_all("shutting down", notify=True)
    assert not sched.has_work() and sched.allocator.num_free == sched.allocator.num_blocks
    assert _deltas(posted)["late"].error == "shutting down"
    loop.publish_snapshot(0.1)
    assert posted[-1].snapshot.relegated == 1


# --- the API server (engine on a thread) ---------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["plain", "async-scheduling"])
def reject_server(request):
    model = load_served_model(MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1, ttft_slo=60.0,
                              tpot_slo=5.0, max_model_len=512, scheduler_options={"late": "reject"},
                              async_scheduling=request.param)
    app = build_app(model, retry_after=2)
    with ServerThread(app) as s:
        s.app = app
        yield s


def _check_429(r) -> dict:
    assert r.status_code == 429, (r.status_code, r.text[:300])
    assert r.headers["retry-after"] == "2"
    assert r.headers[DROPPED_REASON_HEADER] == LATE_REJECT_REASON
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}          # the server's other errors' shape
    assert err["code"] == 429 and err["type"] == "RateLimitError" and err["param"] is None
    assert LATE_REJECT_REASON in err["message"] and "0.001 ms" in err["message"]
    return err


def test_refused_requests_are_429_streamed_or_not(reject_server) -> None:
    app = reject_server.app
    with httpx.Client(base_url=reject_server.url, timeout=60) as c:
        before = metric(c.get("/metrics").text, "fairbatch:request_rejected_total", reason="late")
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        cases = [("/v1/completions", {"prompt": "hello"}), ("/v1/completions", {"prompt": [[1, 2], [3]], "n": 2}),
                 ("/v1/chat/completions", chat)]
        for path, body in cases:
            for stream in (False, True):
                payload = {**body, "max_tokens": 4, "stream": stream, "slo": HOPELESS}
                with c.stream("POST", path, json=payload) as r:   # no 200 was committed first
                    r.read()
                _check_429(r)
        # the same requests with a reachable TTFT are served
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True, "slo": LOOSE})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        with c.stream("POST", "/v1/chat/completions", json={**chat, "max_tokens": 3, "stream": True,
                                                           "ignore_eos": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert not any('"error"' in ln for ln in lines)
        wait_for(lambda: idle(app), "the server to be idle")
        text = c.get("/metrics").text
    # one count per refused engine request (2 prompts x n=2: four), twice each (streamed or not)
    assert metric(text, "fairbatch:request_rejected_total", reason="late") == before + 12
    assert metric(text, "fairbatch:slo_requests_total", slo_class="custom") >= 12     # each a miss


def test_openai_client_gets_a_rate_limit_error(reject_server) -> None:
    client = openai.OpenAI(base_url=reject_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    calls = [
        lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"slo": HOPELESS}),
        lambda: list(client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True,
                                               extra_body={"slo": HOPELESS})),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, extra_body={"slo": HOPELESS}),
        lambda: list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3, stream=True, extra_body={"slo": HOPELESS})),
    ]
    for call in calls:
        with pytest.raises(openai.RateLimitError) as e:
            call()
        assert e.value.status_code == 429
        assert LATE_REJECT_REASON in str(e.value) and "time-to-first-token" in str(e.value)
        assert e.value.response.headers[DROPPED_REASON_HEADER] == LATE_REJECT_REASON
        assert e.value.response.headers["retry-after"] == "2"
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"slo": LOOSE,
                                                                                      "ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    wait_for(lambda: idle(reject_server.app), "the server to be idle")


def test_a_stream_is_refused_before_its_headers_even_when_a_client_gives_up(reject_server) -> None:
    """Many hopeless streams at once, a third of the clients hanging up as soon as they have
    sent: nothing hangs, nothing leaks."""
    async def one(client: httpx.AsyncClient, i: int) -> int | None:
        payload = {"prompt": [1 + i % 50] * 40, "max_tokens": 8, "stream": True, "slo": HOPELESS}
        if i % 3 == 0:
            try:
                await asyncio.wait_for(client.post("/v1/completions", json=payload), 0.001)
            except (asyncio.TimeoutError, httpx.HTTPError):
                return None
        r = await client.post("/v1/completions", json=payload)
        return r.status_code

    async def burst() -> list[int | None]:
        async with httpx.AsyncClient(base_url=reject_server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(30)))

    codes = asyncio.run(burst())
    assert set(codes) <= {429, None} and codes.count(429) >= 20
    wait_for(lambda: idle(reject_server.app), "the server to be idle")


@pytest.mark.parametrize("ahead", [False, True], ids=["plain", "async-scheduling"])
def test_relegated_requests_are_served_and_counted(ahead) -> None:
    model = load_served_model(MODEL, load_format="dummy", policy="vllm", cpu_threads=1, ttft_slo=60.0,
                              tpot_slo=5.0, max_model_len=512, scheduler_options={"late": "relegate"},
                              async_scheduling=ahead)
    app = build_app(model)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for _ in range(3):
            r = c.post("/v1/completions", json={"prompt": "late", "max_tokens": 3, "ignore_eos": True,
                                                "slo": HOPELESS})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # the count reached the front end before the answers did
        assert app.state.engine.snapshot.relegated == 3
        text = c.get("/metrics").text
        assert metric(text, "fairbatch:request_relegated_total") == 3
        assert metric(text, "fairbatch:request_rejected_total", reason="late") == 0
        wait_for(lambda: idle(app), "the server to be idle")


# --- `fairbatch serve --late reject`: a burst against the real thing --------------------------------
FAIRBATCH = [sys.executable, "-c", "from fairbatch.cli import main; main()"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.mark.parametrize("args, message", [
    (["--late", "drop"], "late must be one of serve, relegate, reject"),
    (["--set", "late=drop"], "late must be one of serve, relegate, reject"),
])
def test_serve_bad_late_is_one_line(args, message) -> None:
    from typer.testing import CliRunner

    from fairbatch.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", MODEL, "--load-format", "dummy", "--port", "0", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_serve_late_reject_burst_gets_429s_and_200s() -> None:
    """`fairbatch serve --late reject --ttft-slo 0.05` (engine in its own process), a burst
    of 30 streams at once: a third hopeless (1 us TTFT: 429 for certain), a third with
    10 minutes (200 for certain), a third on the server's 50 ms (either, by load). Every
    answer is a 200 that streams to [DONE] or a clean 429; nothing hangs; the counts in
    /metrics match; the engine frees every block."""
    proc = subprocess.Popen(FAIRBATCH + ["serve", "--model", MODEL, "--load-format", "dummy", "--port", "0",
                                         "--cpu-threads", "1", "--log-level", "warning", "--late", "reject",
                                         "--ttft-slo", "0.05", "--tpot-slo", "1", "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        url = None
        lines = []
        while url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
        assert url, "".join(lines)
        assert "late=reject" in "".join(lines)

        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the server to listen", timeout=120)

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int, dict]:
            body = {"model": MODEL, "prompt": [1 + i % 90] * (20 + 7 * i), "max_tokens": 6, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            if i % 3 == 0:
                body["slo"] = HOPELESS
            elif i % 3 == 1:
                body["slo"] = LOOSE
            async with client.stream("POST", "/v1/completions", json=body) as r:
                raw = (await r.aread()).decode()
            return i, r.status_code, {"headers": dict(r.headers), "raw": raw}

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(30)))

        results = asyncio.run(burst())
        refused = 0
        for i, status, out in results:
            assert status in (200, 429), (i, status, out["raw"][:300])
            if i % 3 == 0:
                assert status == 429, (i, out["raw"][:300])
            if i % 3 == 1:
                assert status == 200, (i, out["raw"][:300])
            if status == 429:
                refused += 1
                assert out["headers"][DROPPED_REASON_HEADER] == LATE_REJECT_REASON
                assert out["headers"]["retry-after"] == "1"
                assert json.loads(out["raw"])["error"]["code"] == 429
            else:
                events = [ln[6:] for ln in out["raw"].split("\n") if ln.startswith("data: ")]
                assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), out["raw"][-300:]
                assert json.loads(events[-2])["usage"]["completion_tokens"] == 6
        assert 10 <= refused <= 20
        text = httpx.get(url + "/metrics", timeout=10).text
        assert metric(text, "fairbatch:request_rejected_total", reason="late") == refused
        assert metric(text, "fairbatch:request_success_total") == 30 - refused

        def drained() -> bool:
            ld = httpx.get(url + "/load", timeout=10).json()
            return ld["free_blocks"] == ld["num_blocks"] and ld["num_requests"] == 0

        wait_for(drained, "the engine to free every block")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rest = proc.stdout.read()
    assert "Traceback" not in rest and "ERROR" not in rest, rest


# --- offline LLM ---------------------------------------------------------------------------------
def test_llm_returns_refused_requests_as_outputs() -> None:
    from fairbatch.engine import LLM
    from fairbatch.engine.params import SamplingParams

    cfg = SchedulerConfig(late="reject", ttft_slo=60.0, tpot_slo=5.0)
    llm = LLM(MODEL, load_format="dummy", scheduler_config=cfg, max_model_len=512)
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    reqs = [llm.make_request("hopeless", sp, slo=SLO(1e-6, 1.0)), llm.make_request("fine", sp),
            llm.make_request([5, 6, 7], sp, slo=SLO(1e-6, 1.0))]
    seen = []
    outs = llm.run([(0.0, reqs[0]), (0.0, reqs[1]), (0.01, reqs[2])], on_finish=lambda r: seen.append(r.request_id))
    assert [o.finish_reason for o in outs] == ["rejected", "length", "rejected"]
    assert outs[0].token_ids == [] and outs[0].text == "" and outs[2].token_ids == []
    assert len(outs[1].token_ids) == 4
    assert sorted(seen) == sorted(r.request_id for r in reqs)      # every request ends, refused ones too
    a = llm.engine.allocator
    assert a.num_free == a.num_blocks and not llm.scheduler.has_work()
    assert llm.scheduler.stats.rejected == 2


# --- fairbatch bench -----------------------------------------------------------------------------------
def _trace(path, n: int) -> None:
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    lines += [f"{0.005 * i:.4f},{8 + i},{3 + i % 4}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def test_bench_counts_429s_as_rejected(reject_server, tmp_path) -> None:
    from fairbatch.bench.run import BenchConfig, prepare, run_once

    _trace(tmp_path / "t.csv", 24)
    # half the requests hopeless (1 us TTFT), half with ten minutes
    cfg = BenchConfig(base_url=reject_server.url, trace=str(tmp_path / "t.csv"), num_prompts=None, timeout=120.0,
                      slo_classes="hopeless:0.000001:5:0.5,loose:600:5:0.5")
    wl = prepare(cfg)
    doomed = sum(r.slo.name == "hopeless" for r in wl.requests)
    assert 0 < doomed < len(wl.requests)
    out = run_once(cfg, wl)
    s = out.summary
    by_class = {r.request_id: r.slo.name for r in wl.requests}
    for rec in out.records:
        if by_class[rec.request_id] == "hopeless":
            assert rec.error == REJECTED and rec.rejected and not rec.success and rec.output_len == 0
        else:
            assert rec.success, rec.error
    assert s["rejected"] == doomed and s["failed"] == doomed and s["completed"] == len(wl.requests) - doomed
    assert s["failure_reasons"] == {REJECTED: doomed}
    assert s["slo_attainment"] <= (len(wl.requests) - doomed) / len(wl.requests) + 1e-12   # refused: misses
    assert s["per_class"]["hopeless"]["rejected"] == doomed
    assert s["server_relegated"] == 0 and s["relegated"] == 0        # refused, not relegated
    wait_for(lambda: idle(reject_server.app), "the server to be idle")


def test_bench_reports_the_servers_relegated_count(tmp_path) -> None:
    from fairbatch.bench.run import BenchConfig, prepare, run_once

    model = load_served_model(MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1, ttft_slo=60.0,
                              tpot_slo=5.0, max_model_len=512, scheduler_options={"late": "relegate"})
    app = build_app(model)
    _trace(tmp_path / "t.csv", 16)
    with ServerThread(app) as s:
        cfg = BenchConfig(base_url=s.url, trace=str(tmp_path / "t.csv"), num_prompts=None, timeout=120.0,
                          slo_classes="hopeless:0.000001:5:0.5,loose:600:5:0.5")
        wl = prepare(cfg)
        doomed = sum(r.slo.name == "hopeless" for r in wl.requests)
        out = run_once(cfg, wl)
    s = out.summary
    assert s["completed"] == len(wl.requests) and s["rejected"] == 0
    # relegated at arrival, each once; the warm-up probe (before the count starts) is not among them
    assert s["server_relegated"] == doomed and s["relegated"] == doomed
