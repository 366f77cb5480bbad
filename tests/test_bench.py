"""`fairbatch bench` against a real server on 127.0.0.1 (tiny dummy model) and against a
misbehaving fake server: every request accounted for, failures with their reasons,
metrics consistent, JSON comparable with the simulator's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fairbatch.bench.commands import parse_goodput  # noqa: E402
from fairbatch.bench.run import BenchConfig, prepare, run_once  # noqa: E402
from fairbatch.cli import app as cli  # noqa: E402
from fairbatch.metrics import SLO_KEYS, vllm_keys  # noqa: E402
from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402

runner = CliRunner()


def write_trace(path, arrivals, prompts, outputs) -> None:
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    lines += [f"{a:.6f},{p},{o}" for a, p, o in zip(arrivals, prompts, outputs, strict=True)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def server():
    model = load_served_model("tiny-llama", load_format="dummy", policy="fairbatching", cpu_threads=1)
    app = build_app(model)
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def trace50(tmp_path_factory):
    rng = np.random.default_rng(7)
    n = 50
    path = tmp_path_factory.mktemp("trace") / "small.csv"
    arrivals = np.cumsum(rng.exponential(0.03, n)) - 0.0
    arrivals -= arrivals[0]
    prompts = rng.integers(4, 120, n)
    outputs = rng.integers(2, 40, n)
    write_trace(path, arrivals, prompts, outputs)
    return path, prompts.tolist(), outputs.tolist()


def test_bench_50_requests_end_to_end(server, trace50, tmp_path):
    path, prompts, outputs = trace50
    out = tmp_path / "result.json"
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--trace", str(path), "--num-prompts", "50",
                            "--slo-classes", "tight:0.5:0.05:0.3,loose:60:5:0.7", "--save-result", str(out),
                            "--save-detailed"])
    assert r.exit_code == 0, r.output
    assert "Serving Benchmark Result" in r.output and "Successful requests:" in r.output
    assert "Envelope attainment (%):" in r.output
    res = json.loads(out.read_text())
    assert res["completed"] == 50 and res["failed"] == 0 and res["failure_reasons"] == {}
    # exact lengths: token-id prompts of the trace's lengths, ignore_eos + max_tokens
    assert res["input_lens"] == prompts and res["output_lens"] == outputs
    assert res["total_input_tokens"] == sum(prompts) and res["total_output_tokens"] == sum(outputs)
    assert all(e == "" for e in res["errors"])
    # one arrival time per token: ITLs per request = output_len - 1
    assert [len(x) for x in res["itls"]] == [o - 1 for o in outputs]
    assert all(t > 0 for t in res["ttfts"])
    # vLLM's keys plus ours, internally consistent
    for key in vllm_keys() + list(SLO_KEYS) + ["request_rate", "num_prompts", "model_id", "date", "per_class"]:
        assert key in res, key
    assert math.isclose(res["request_throughput"] * res["duration"], 50, rel_tol=1e-9)
    assert math.isclose(res["output_throughput"] * res["duration"], sum(outputs), rel_tol=1e-9)
    assert res["mean_e2el_ms"] >= res["mean_ttft_ms"] > 0
    assert res["p99_ttft_ms"] >= res["median_ttft_ms"]
    assert 0 <= res["slo_attainment"] <= res["ttft_attainment"] <= 1
    assert res["request_goodput"] <= res["request_throughput"] + 1e-9
    assert res["model_id"] == "tiny-llama" and res["label"] == "fairbatching"
    classes = res["per_class"]
    assert set(classes) == {"tight", "loose"}
    assert sum(c["completed"] for c in classes.values()) == 50
    assert classes["loose"]["slo_attainment"] == 1.0          # 60 s TTFT, 5 s TPOT
    assert res["runs"][0]["completed"] == 50 and "scenario" in res
    # the server saw the same classes: its SLO metrics are labelled by them
    with httpx.Client(base_url=server.url) as c:
        metrics = c.get("/metrics").text
        load = c.get("/load").json()
    assert 'slo_class="tight"' in metrics and 'slo_class="loose"' in metrics
    assert load["free_blocks"] == load["num_blocks"]


def test_bench_workers_share_the_schedule(server, trace50, tmp_path):
    """Several client processes: every request sent once, at its own arrival, with its
    exact length, and the records back in the trace's order."""
    path, prompts, outputs = trace50
    out = tmp_path / "result.json"
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--trace", str(path), "--num-prompts", "50",
                            "--workers", "3", "--save-result", str(out), "--save-detailed"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["completed"] == 50 and res["failed"] == 0
    assert res["input_lens"] == prompts and res["output_lens"] == outputs
    assert [len(x) for x in res["itls"]] == [o - 1 for o in outputs]
    # the trace spans ~1.5 s: three processes starting together keep its pace
    assert res["duration"] < 30
    bad = runner.invoke(cli, ["bench", "--base-url", server.url, "--trace", str(path), "--workers", "2",
                              "--max-concurrency", "4"])
    assert bad.exit_code != 0 and "--max-concurrency" in bad.output


def test_bench_json_comparable_with_simulator(server, trace50, tmp_path):
    from fairbatch.sim.experiment import Scenario, run_policy
    from fairbatch.sim.experiment import prepare as sim_prepare

    path, _, _ = trace50
    out = tmp_path / "r.json"
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--trace", str(path), "--num-prompts", "12",
                            "--rate-scale", "4", "--goodput", "ttft:5000", "tpot:500", "--save-result", str(out)])
    assert r.exit_code == 0, r.output
    bench = json.loads(out.read_text())
    assert bench["completed"] == 12 and bench["scenario"]["ttft_slo"] == 5.0 and bench["scenario"]["tpot_slo"] == 0.5
    sim = run_policy(sim_prepare(Scenario(trace=str(path), num_requests=12, model="tiny-llama", ttft_slo=5.0,
                                          tpot_slo=0.5)), "fairbatching", 4.0).row()
    missing = set(sim) - set(bench["runs"][0]) - {"num_preemptions", "sim_wall_time_s"}
    assert not missing, missing
    assert math.isclose(sim["request_rate"], bench["request_rate"], rel_tol=1e-9)
    assert sim["total_input_tokens"] == bench["total_input_tokens"]
    assert sim["total_output_tokens"] == bench["total_output_tokens"]


def test_bench_capacity_and_request_rate(server, trace50, tmp_path):
    path, _, _ = trace50
    out = tmp_path / "cap.json"
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--trace", str(path), "--num-prompts", "8",
                            "--capacity", "--capacity-lo", "1", "--capacity-hi", "2", "--ttft-slo", "60",
                            "--tpot-slo", "5", "--save-result", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for t in ("0.9", "0.99"):    # both targets, from the same two runs
        search = res["capacity_search"]["fairbatching"][t]
        assert search["status"] == "above_range" and search["rate_scale"] == 2.0
        assert [p["rate_scale"] for p in search["points"]] == [1.0, 2.0]
        assert res["capacity"]["fairbatching"][t] > 0
    assert len(res["runs"]) == 2
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--trace", str(path), "--num-prompts", "10",
                            "--request-rate", "inf", "--max-concurrency", "4"])
    assert r.exit_code == 0, r.output
    assert "Maximum request concurrency:" in r.output and "Successful requests:                     10" in r.output


def test_bench_user_errors_are_one_line(tmp_path):
    cases = [
        ["bench", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2"],          # nothing listens there
        ["bench", "--rate-scale", "2", "--request-rate", "3"],
        ["bench", "--goodput", "ttft:abc"],
        ["bench", "--goodput", "e2el:100"],
        ["bench", "stray-argument"],
        ["bench", "--extra-body", "[1]"],
    ]
    for args in cases:
        r = runner.invoke(cli, args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 0.5, "tpot": 0.05}
    assert parse_goodput(["ttft:500 tpot:50"]) == {"ttft": 0.5, "tpot": 0.05}


# --- a server that misbehaves in every way a bench must notice ------------------------------------
def _fake_app():
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 4096}]}

    def chunk(i: int, reason=None) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": reason}]}) + "\n\n"

    def usage(n: int) -> str:
        return "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n, "prompt_tokens": 1}}) + "\n\n"

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        n = body["max_tokens"]
        if n == 5:
            return JSONResponse({"error": {"message": "boom", "code": 500}}, status_code=500)

        async def gen():
            if n == 6:                                   # drops the connection mid-stream
                yield chunk(0)
                yield chunk(1)
                raise RuntimeError("dropped")
            if n == 7:                                   # fewer tokens than asked, cleanly
                for i in range(3):
                    yield chunk(i, "stop" if i == 2 else None)
                yield usage(3)
            elif n == 9:                                 # an error event in the stream
                yield chunk(0)
                yield "data: " + json.dumps({"error": {"message": "engine fell over"}}) + "\n\n"
            elif n == 10:                                # ends without [DONE]
                for i in range(10):
                    yield chunk(i)
                return
            elif n == 11:                                # several tokens per event: 4 events, 11 tokens
                for i in range(4):
                    yield chunk(i, "length" if i == 3 else None)
                yield usage(11)
            else:                                        # correct
                for i in range(n):
                    yield chunk(i, "length" if i == n - 1 else None)
                yield usage(n)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def test_bench_counts_every_failure_with_its_reason(tmp_path):
    path = tmp_path / "t.csv"
    outputs = [5, 6, 7, 8, 9, 10, 11, 12]
    write_trace(path, [0.01 * i for i in range(len(outputs))], [4] * len(outputs), outputs)
    with ServerThread(_fake_app()) as s:
        cfg = BenchConfig(base_url=s.url, trace=str(path), num_prompts=None, warmup=False)
        wl = prepare(cfg)
        assert wl.model == "fake"
        out = run_once(cfg, wl)
    by_len = {r.output_len if r.success else outputs[int(r.request_id.split("-")[1])]: r for r in out.records}
    assert out.summary["completed"] == 3 and out.summary["failed"] == 5
    assert by_len[5].error.startswith("HTTP 500: boom")
    assert "ClientPayloadError" in by_len[6].error or "without [DONE]" in by_len[6].error
    assert by_len[7].error == "short output: 3 of 7 tokens"
    assert by_len[9].error == "server error in stream: engine fell over"
    assert by_len[10].error == "stream ended without [DONE]"
    assert by_len[8].success and by_len[12].success
    packed = by_len[11]                                  # 4 events carried 11 tokens
    assert packed.success and packed.output_len == 11 and len(packed.token_times) == 11
    assert packed.token_times[-1] == packed.token_times[3]
    assert sum(out.summary["failure_reasons"].values()) == 5


def test_sse_lines_split_only_on_newlines() -> None:
    """A raw U+2028 / U+0085 inside an event's JSON must not cut the event (httpx's
    aiter_lines would); the server also escapes them (ASCII-only JSON)."""
    import asyncio

    import httpx

    from fairbatch.wire.sse import encode_event as sse_event
    from fairbatch.wire.sse import lines as sse_lines

    body = 'data: {"text":"a\u2028b\x85c"}\r\n\r\ndata: [DONE]\n\n'.encode()

    async def collect() -> list[str]:
        resp = httpx.Response(200, stream=httpx.ByteStream(body))
        return [line async for line in sse_lines(resp.aiter_bytes())]

    lines = asyncio.run(collect())
    assert lines == ['data: {"text":"a\u2028b\x85c"}', "", "data: [DONE]", ""]
    assert sse_event({"text": "a\u2028b\x85c"}).isascii()
