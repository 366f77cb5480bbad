"""Command-line input (issue #14, item 10): every bad value is one error line naming the
option, exit status 2, before any work; user text is printed as typed (no rich markup, no
emoji codes)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fairbatch.cli import app as cli


def run(args: list[str]):
    return CliRunner().invoke(cli, args, env={"COLUMNS": "200"})


@pytest.mark.parametrize("args, shown", [
    (["simulate", "--slo-classes", "a:x:0.03:0.3", "--num-requests", "5"], "a:x:0.03:0.3"),
    (["simulate", "--trace", "[/]x.csv"], "[/]x.csv"),
    (["simulate", "--trace", "[bold]x.csv"], "[bold]x.csv"),
])
def test_user_text_is_printed_as_typed(args, shown):
    res = run(args)
    assert res.exit_code == 2, res.output
    assert shown in res.output and "Traceback" not in res.output
    assert "\u274c" not in res.output                # ":x:" is not an emoji


@pytest.mark.parametrize("args, option", [
    (["simulate", "--target", "1.5"], "--target"),
    (["simulate", "--target", "0"], "--target"),
    (["tune", "--target", "2"], "--target"),
    (["simulate", "--request-rate", "0"], "--request-rate"),
    (["simulate", "--load-interval", "-1"], "--load-interval"),
    (["serve", "--model", "tiny-llama", "--port", "99999"], "--port"),
    (["route", "--backend", "http://127.0.0.1:1", "--port", "-1"], "--port"),
    (["cluster", "--model", "tiny-llama", "--port", "70000"], "--port"),
    (["serve", "--model", "tiny-llama", "--max-choices", "0"], "--max-choices"),
    (["serve", "--model", "tiny-llama", "--header-timeout", "0"], "--header-timeout"),
    (["route", "--backend", "http://127.0.0.1:1", "--failures-to-mark-down", "0"], "--failures-to-mark-down"),
])
def test_out_of_range_values_are_one_usage_error(args, option):
    res = run(args)
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output


def test_deadline_rule_lists_the_valid_values():
    res = run(["simulate", "--deadline-rule", "foo"])
    assert res.exit_code == 2
    assert "envelope" in res.output and "tpot-safe" in res.output


def test_json_pointing_at_a_directory_is_refused_before_the_run(tmp_path):
    res = run(["simulate", "--json", str(tmp_path), "--num-requests", "5"])
    assert res.exit_code == 2 and "is a directory" in res.output
    assert "attain" not in res.output.lower()        # no run happened


def test_a_profile_for_another_model_is_named(tmp_path):
    from fairbatch.cli_checks import profile_mismatch

    p = tmp_path / "p.json"
    p.write_text(json.dumps({"kind": "linear", "meta": {"model": "qwen2.5-7b", "gpu": "h100"}}))
    why = profile_mismatch(p, "llama-3-8b", "h100")
    assert why is not None and "qwen2.5-7b" in why and "--model llama-3-8b" in why
    assert profile_mismatch(p, "qwen2.5-7b", "h100") is None


def test_cluster_with_an_address_needs_a_replica_host():
    from fairbatch.cluster.launcher import Cluster, ClusterSpec

    with pytest.raises(ValueError, match="--replica-host"):
        Cluster(ClusterSpec(launcher="ray", address="auto"))
    assert Cluster(ClusterSpec(launcher="local")).spec.replica_host is None     # loopback by default
