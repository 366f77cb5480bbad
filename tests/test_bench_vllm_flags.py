"""`fairbatch bench` as a drop-in for `vllm bench serve`: vLLM's flags, vLLM's
definitions of ITL, peak concurrency and configured rate, goodput and preemptions only
when known, a nonzero exit past --max-failure-ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from typer.testing import CliRunner  # noqa: E402

from fairbatch.bench.vllm_compat import (  # noqa: E402
    itl_summary,
    keep_percentile_metrics,
    max_concurrent_requests,
    normalize_arrivals,
    random_entries,
    result_filename,
)
from fairbatch.cli import app as cli  # noqa: E402
from fairbatch.metrics import RequestRecord  # noqa: E402
from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from fairbatch.workload import GammaArrivals, retime  # noqa: E402

runner = CliRunner()


def record(rid, start, events, ok=True) -> RequestRecord:
    t = np.asarray(events, dtype=float)
    return RequestRecord(request_id=rid, arrival=start, prompt_len=4, output_len=len(events), ttft_slo=1.0,
                         tpot_slo=1.0, slo_class="default", first_token_time=events[0], token_times=t,
                         finish_time=events[-1], success=ok, error=None if ok else "x")


# --- vLLM's definitions, one by one ------------------------------------------------------------
def test_arrivals_hit_the_configured_rate():
    entries = retime(random_entries(200, 8, 4, 0.0, seed=1), GammaArrivals(10.0, 0.5), seed=3)
    out = normalize_arrivals(entries, 10.0)
    assert out[-1].arrival == pytest.approx(199 / 10.0)
    # relative gaps kept
    ratio = [b.arrival / a.arrival for a, b in zip(entries[1:], out[1:])]
    assert max(ratio) == pytest.approx(min(ratio))


def test_itl_is_per_event_as_vllm_counts_it():
    # 5 tokens in 3 events: vLLM sees two gaps (1.0 s, 0.5 s), not one gap and zeros
    recs = [record("a", 0.0, [0.5, 1.5, 2.0]), record("b", 0.0, [0.1, 9.0], ok=False)]
    events = {"a": [0.5, 1.5, 2.0], "b": [0.1, 9.0]}
    s = itl_summary(recs, events, (50, 99))
    assert s["mean_itl_ms"] == pytest.approx(750.0) and s["median_itl_ms"] == pytest.approx(750.0)
    assert s["p99_itl_ms"] == pytest.approx(995.0)


def test_max_concurrency_per_second_buckets():
    # vLLM counts a request in every whole second from its start to its end: these two
    # never overlap in time but share second 1
    recs = [record("a", 0.0, [0.2, 1.1]), record("b", 1.5, [1.6, 2.2])]
    assert max_concurrent_requests(recs) == 2
    assert max_concurrent_requests([record("c", 0.0, [0.1])]) == 1


def test_percentile_metric_selection_and_file_name():
    s = {"mean_ttft_ms": 1, "p99_ttft_ms": 2, "mean_e2el_ms": 3, "p99.9_e2el_ms": 4, "std_e2el_ms": 5,
         "completed": 7}
    assert keep_percentile_metrics(s, ("ttft",)) == {"mean_ttft_ms": 1, "p99_ttft_ms": 2, "completed": 7}
    from datetime import datetime

    name = result_filename("vllm", 10.0, 8, "org/Model-8B", datetime(2026, 11, 30, 5, 6, 7))
    assert name == "vllm-10.0qps-concurrency8-Model-8B-20261130-050607.json"
    assert result_filename("x", float("inf"), None, "m", datetime(2026, 11, 30)) == "x-infqps-m-20261130-000000.json"


def test_random_dataset_lengths():
    e = random_entries(500, 100, 10, 0.5, seed=0)
    ins = [x.prompt_len for x in e]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 20
    assert all(x.prompt_len == 100 for x in random_entries(20, 100, 10, 0.0, seed=0))


# --- the command, against our server -----------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    model = load_served_model("tiny-llama", load_format="dummy", cpu_threads=1)
    with ServerThread(build_app(model)) as s:
        yield s


def test_vllm_flags_end_to_end(server, tmp_path):
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--dataset-name", "random", "--random-input-len", "8",
                            "--random-output-len", "3", "--num-prompts", "6", "--request-rate", "40",
                            "--ignore-eos", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
                            "--save-result", "--result-dir", str(tmp_path), "--save-detailed"])
    assert r.exit_code == 0, r.output
    assert "Request rate configured (RPS):           40.00" in r.output
    assert "Request goodput" not in r.output                  # no SLO asked for: no goodput line
    [path] = list(tmp_path.glob("*.json"))
    assert path.name.startswith("openai-40.0qps-tiny-llama-")     # vLLM's name for the same run
    res = json.loads(path.read_text())
    assert res["completed"] == 6 and res["request_rate"] == 40 and res["request_goodput"] is None
    assert {"p50_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "mean_itl_ms"} <= set(res)
    assert not any(k.endswith("_tpot_ms") or k.endswith("_e2el_ms") for k in res)
    assert res["total_input_tokens"] == 6 * 8 and res["total_output_tokens"] == 6 * 3
    assert res["mean_preemptions"] == 0.0                     # read from our server's /metrics
    for key in ("latencies", "start_times", "queue_times", "ttfts", "itls", "input_lens", "output_lens"):
        assert len(res[key]) == 6, key
    assert all(lat >= ttft > 0 for lat, ttft in zip(res["latencies"], res["ttfts"]))
    assert all(q >= 0 for q in res["queue_times"])
    # an explicit file name, and goodput when an SLO is given
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--dataset-name", "random", "--random-input-len", "4",
                            "--random-output-len", "2", "--num-prompts", "3", "--request-rate", "inf",
                            "--goodput", "ttft:60000", "--save-result", "--result-dir", str(tmp_path),
                            "--result-filename", "named.json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "named.json").read_text())["request_goodput"] > 0


def test_failure_ratio_sets_the_exit_status(server):
    # max_tokens 2 in every body while 8 are expected: each request fails (short output)
    args = ["bench", "--base-url", server.url, "--dataset-name", "random", "--random-input-len", "6",
            "--random-output-len", "8", "--num-prompts", "3", "--request-rate", "inf",
            "--extra-body", json.dumps({"max_tokens": 2})]
    r = runner.invoke(cli, args)
    assert r.exit_code == 1 and "3 of 3 requests failed" in r.output, r.output
    assert runner.invoke(cli, [*args, "--max-failure-ratio", "1"]).exit_code == 0
    bad = runner.invoke(cli, [*args, "--dataset-name", "sharegpt"])
    assert bad.exit_code == 2 and "sharegpt" in bad.output


def test_text_datasets_tokenized_by_the_server(server, tmp_path):
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hello there friend"}, {"from": "gpt", "value": "fine thanks"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "too short a prompt"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "what is two plus two"}, {"from": "gpt", "value": "four!"}]},
    ]))
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--dataset-name", "sharegpt", "--dataset-path",
                            str(sharegpt), "--num-prompts", "10", "--request-rate", "inf", "--save-result",
                            "--result-dir", str(tmp_path), "--result-filename", "sg.json.out", "--save-detailed"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sg.json.out").read_text())
    # the byte tokenizer: one token per byte; the 2-token prompt and the 1-turn one are skipped
    assert sorted(zip(res["input_lens"], res["output_lens"])) == [(18, 11), (20, 5)]
    custom = tmp_path / "c.jsonl"
    custom.write_text('{"prompt": "abcd"}\n\n{"prompt": "efghij"}\n')
    r = runner.invoke(cli, ["bench", "--base-url", server.url, "--dataset-name", "custom", "--dataset-path",
                            str(custom), "--custom-output-len", "3", "--request-rate", "inf", "--save-result",
                            "--result-dir", str(tmp_path), "--result-filename", "c.out", "--save-detailed"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c.out").read_text())
    assert res["input_lens"] == [4, 6] and res["output_lens"] == [3, 3]
