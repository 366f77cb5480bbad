"""Per-token deadlines and slack."""

from __future__ import annotations

import pytest

from fairbatch.request import SLO, DeadlineRule, Request


def test_envelope_deadlines() -> None:
    r = Request("a", 10.0, 100, 5, SLO(2.0, 0.1), deadline_rule=DeadlineRule.ENVELOPE)
    assert r.token_deadline(0) == pytest.approx(12.0)
    assert r.token_deadline(3) == pytest.approx(12.3)
    r.record_token(10.5)               # first token 1.5 s early
    assert r.next_deadline() == pytest.approx(12.1)   # the envelope keeps the earned slack


def test_tpot_safe_deadline_is_relative_to_first_token() -> None:
    r = Request("a", 10.0, 100, 5, SLO(2.0, 0.1))
    assert r.deadline_rule is DeadlineRule.TPOT_SAFE
    assert r.next_deadline() == pytest.approx(12.0)   # before the first token: the envelope
    r.record_token(10.5)
    assert r.next_deadline() == pytest.approx(10.6)   # no earned slack to spend
    r.record_token(10.55)
    assert r.next_deadline() == pytest.approx(10.7)
    # A late first token: the envelope is the tighter bound again.
    late = Request("b", 0.0, 100, 5, SLO(1.0, 0.1))
    late.record_token(1.5)
    assert late.next_deadline() == pytest.approx(1.1)


def test_meeting_tpot_safe_deadlines_bounds_vllm_tpot() -> None:
    r = Request("a", 0.0, 100, 4, SLO(1.0, 0.05))
    t = 0.2
    for _ in range(4):
        r.record_token(t)
        t = r.next_deadline()          # every token exactly at its deadline
    tpot = (r.token_times[-1] - r.first_token_time) / (r.generated - 1)
    assert tpot <= 0.05 + 1e-12


def test_lateness_tracks_the_envelope() -> None:
    r = Request("a", 0.0, 10, 3, SLO(1.0, 0.1))
    r.record_token(0.9)
    r.record_token(1.05)
    assert r.max_lateness < 0
    r.record_token(1.3)                # deadline 1.2
    assert r.max_lateness == pytest.approx(0.1)


def test_token_accounting_and_recompute() -> None:
    r = Request("a", 0.0, 5, 3, SLO(1.0, 0.1))
    assert r.pending_tokens == 5 and r.is_prefilling
    r.num_computed = 5
    r.record_token(0.1)
    assert r.pending_tokens == 1 and not r.is_prefilling
    r.reset_for_recompute()
    assert r.pending_tokens == 6 and r.is_prefilling and r.num_preemptions == 1


def test_bad_requests() -> None:
    with pytest.raises(ValueError):
        Request("a", 0.0, 0, 3, SLO(1.0, 0.1))
    with pytest.raises(ValueError):
        Request("a", 0.0, 3, 0, SLO(1.0, 0.1))
    with pytest.raises(ValueError):
        SLO(0.0, 0.1)


def test_set_arrival_moves_the_first_deadline():
    """A request built before submission (server, LLM.run) gets its TTFT deadline from the
    submission time, not from the placeholder arrival it was built with."""
    r = Request("a", 0.0, 4, 4, SLO(1.0, 0.1))
    r.set_arrival(100.0)
    assert r.arrival == 100.0 and r.deadline == 101.0
    r.record_token(100.5, 7)
    assert r.deadline == pytest.approx(100.6)     # TPOT-safe: the first token came early
    with pytest.raises(ValueError):
        r.set_arrival(200.0)


def test_pace_spaces_deadlines_inside_the_slo() -> None:
    r = Request("a", 10.0, 100, 5, SLO(2.0, 0.1))
    r.set_pace(0.09)
    assert r.next_deadline() == pytest.approx(12.0)   # the first token's deadline is the TTFT's
    r.record_token(10.5)
    assert r.next_deadline() == pytest.approx(10.59)
    assert r.token_deadline(3) == pytest.approx(10.77)
    assert r.slo.tpot == 0.1                          # the SLO it is judged by is unchanged
    with pytest.raises(ValueError, match="once tokens exist"):
        r.set_pace(0.08)


def test_fairbatching_paces_with_its_margin() -> None:
    from fairbatch.kv import BlockAllocator
    from fairbatch.latency.linear import LinearLatencyModel
    from fairbatch.scheduler import SchedulerConfig, make_scheduler

    model = LinearLatencyModel(0.005, 1e-5)
    fb = make_scheduler("fairbatching", SchedulerConfig(tpot_margin=0.2), BlockAllocator(100, 16), model)
    r = Request("a", 0.0, 32, 4, SLO(1.0, 0.05))
    fb.add(r, 0.0)
    assert r.pace == pytest.approx(0.04)
    plain = make_scheduler("fairbatching", SchedulerConfig(), BlockAllocator(100, 16), model)
    q = Request("b", 0.0, 32, 4, SLO(1.0, 0.05))
    plain.add(q, 0.0)
    assert q.pace == 0.05
    with pytest.raises(ValueError, match="tpot_margin"):
        make_scheduler("fairbatching", SchedulerConfig(tpot_margin=1.0), BlockAllocator(100, 16), model)


def test_first_token_planned_early_keeps_the_slo() -> None:
    """A scheduler's TTFT margin moves the first token's planned deadline only: a first
    token after it but within the SLO is on time, and later deadlines follow the SLO."""
    from fairbatch.kv import BlockAllocator
    from fairbatch.latency.linear import LinearLatencyModel
    from fairbatch.scheduler import SchedulerConfig, make_scheduler

    sched = make_scheduler("qoserve", SchedulerConfig(ttft_margin=0.3), BlockAllocator(100),
                           LinearLatencyModel(a=0.01, b=1e-4))
    r = Request("a", 10.0, 100, 5, SLO(1.0, 0.1))
    sched.add(r, 10.0)
    assert r.next_deadline() == pytest.approx(10.7)
    r.record_token(10.9)                 # past the planned deadline, inside the SLO
    assert not r.ttft_missed
    assert r.next_deadline() == pytest.approx(11.0)
    tight = Request("b", 10.0, 100, 5, SLO(0.2, 0.1))
    sched.add(tight, 10.0)
    assert tight.next_deadline() == pytest.approx(10.1)   # at most half the TTFT
