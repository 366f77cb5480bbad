"""The tools of a fair comparison: policy variants, the budget sweep (`fairbatch tune`),
capacity at several attainment targets, and `simulate` with one `late` for every policy."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fairbatch.cli import app as cli
from fairbatch.metrics import find_capacities
from fairbatch.scheduler import SchedulerConfig
from fairbatch.scheduler.variant import parse_variant
from fairbatch.sim.experiment import Scenario, prepare, run_policy
from fairbatch.sim.tune import tune


def test_variant_sets_config_fields_and_refuses_unknown_ones() -> None:
    v = parse_variant("sarathi:chunk_size=1536,late=reject")
    assert v.name == "sarathi" and v.label == "sarathi:chunk_size=1536,late=reject"
    cfg = v.config(SchedulerConfig())
    assert (cfg.chunk_size, cfg.late) == (1536, "reject")
    assert parse_variant("qoserve").config(SchedulerConfig()) == SchedulerConfig()
    with pytest.raises(ValueError, match="unknown policy"):
        parse_variant("nope:chunk_size=1")
    with pytest.raises(ValueError, match="bad policy setting"):
        parse_variant("sarathi:chunksize=1536")
    with pytest.raises(ValueError, match="late must be one of"):
        parse_variant("vllm:late=drop").config(SchedulerConfig())


def test_a_variant_runs_with_its_own_settings() -> None:
    prep = prepare(Scenario(trace="azure-code", num_requests=300))
    small = run_policy(prep, "sarathi:chunk_size=256,late=serve", 1.0).outcome
    big = run_policy(prep, "sarathi:chunk_size=2048,late=serve", 1.0).outcome
    assert small.steps[0] > big.steps[0]     # a smaller budget needs more steps for the same prompts


def test_capacities_share_runs_between_targets() -> None:
    calls: list[float] = []

    def run(s: float) -> dict:
        calls.append(s)
        return {"slo_attainment": 1.0 / (1.0 + (s / 4.0) ** 4), "request_throughput": 2.0 * s}

    caps = find_capacities(run, lo=1.0, targets=(0.99, 0.9), rel_tol=0.01)
    assert caps[0.9].rate_scale > caps[0.99].rate_scale > 0
    assert run(caps[0.99].rate_scale)["slo_attainment"] >= 0.99
    assert len(calls) - 1 == len(set(calls[:-1]))    # no scale simulated twice


def test_tune_reports_capacity_per_budget_and_the_best() -> None:
    sc = Scenario(trace="azure-code", num_requests=200)
    rep = tune(sc, "sarathi", grid=(256, 2048), targets=(0.9,), extra="late=serve")
    assert [r["value"] for r in rep["rows"]] == [256, 2048]
    assert all(r["variant"].endswith(",late=serve") for r in rep["rows"])
    best = rep["best"]["0.9"]
    assert best["request_rate"] == max(r["capacity"]["0.9"]["request_rate"] for r in rep["rows"])
    with pytest.raises(ValueError, match="nothing to tune"):
        tune(sc, "fairbatching")


def test_tune_and_simulate_cli(tmp_path) -> None:
    out = tmp_path / "tune.json"
    res = CliRunner().invoke(cli, ["tune", "--trace", "azure-code", "--num-requests", "150", "-p", "vllm",
                                   "--grid", "512,4096", "--target", "0.9", "--jobs", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "best at 90%" in res.output and json.loads(out.read_text())["knob"] == "max_num_batched_tokens"
    bad = CliRunner().invoke(cli, ["tune", "--grid", "a,b"])
    assert bad.exit_code == 2 and "bad --grid" in bad.output

    rep = tmp_path / "sim.json"
    res = CliRunner().invoke(cli, ["simulate", "--trace", "azure-code", "--num-requests", "150", "--late", "reject",
                                   "-p", "sarathi:chunk_size=1024", "-p", "qoserve", "--no-sweep", "--rate-scale", "4",
                                   "--jobs", "1", "--json", str(rep), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["scenario"]["scheduler"] == {"late": "reject"}
    assert [r["policy"] for r in report["runs"]] == ["sarathi:chunk_size=1024", "qoserve"]
    assert all("rejected" in r and "relegated" in r for r in report["runs"])
    bad = CliRunner().invoke(cli, ["simulate", "--late", "drop", "--num-requests", "10"])
    assert bad.exit_code == 2 and "late must be one of" in bad.output
