"""Scenario.served_offset: the simulator judges what a served stack's clients would see
(every token ``offset`` later than the engine made it) without changing the schedule."""

from __future__ import annotations

import pytest

from fairbatch.sim.experiment import Scenario, prepare, run_policy, served_offsets


@pytest.mark.parametrize("policy", ["fairbatching", "qoserve"])
def test_offset_moves_ttft_not_tpot_or_schedule(policy: str) -> None:
    plain = run_policy(prepare(Scenario(trace="azure-code", num_requests=200)), policy, 1.0).summary
    offset = run_policy(prepare(Scenario(trace="azure-code", num_requests=200, served_offset=0.2)), policy, 1.0).summary
    assert offset["median_ttft_ms"] == pytest.approx(plain["median_ttft_ms"] + 200.0)
    assert offset["mean_e2el_ms"] == pytest.approx(plain["mean_e2el_ms"] + 200.0)
    assert offset["median_tpot_ms"] == pytest.approx(plain["median_tpot_ms"])
    assert offset["num_preemptions"] == plain["num_preemptions"]
    # 200 ms of a 1 s TTFT: some first tokens that were on time no longer are
    assert offset["ttft_attainment"] <= plain["ttft_attainment"]


def test_an_offset_past_the_ttft_misses_every_first_token() -> None:
    s = run_policy(prepare(Scenario(trace="azure-code", num_requests=50, served_offset=1.0)), "fairbatching").summary
    assert s["ttft_attainment"] == 0.0


def test_a_spread_offset_keeps_its_mean_and_is_the_same_for_every_policy() -> None:
    sc = Scenario(trace="azure-code", num_requests=200, served_offset=0.2, served_offset_cv=1.0)
    offsets = served_offsets(sc, 5000)
    assert offsets.mean() == pytest.approx(0.2, rel=0.05) and offsets.std() == pytest.approx(0.2, rel=0.1)
    assert (served_offsets(sc, 5000) == offsets).all()
    plain = run_policy(prepare(Scenario(trace="azure-code", num_requests=200)), "qoserve").summary
    spread = run_policy(prepare(sc), "qoserve").summary
    assert spread["mean_ttft_ms"] == pytest.approx(plain["mean_ttft_ms"] + 1e3 * served_offsets(sc, 200).mean())
    assert spread["median_tpot_ms"] == pytest.approx(plain["median_tpot_ms"])
