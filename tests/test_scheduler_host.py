"""The scheduler interface of a host that owns the request list and applies step results
itself (the vLLM plugin): ``sync_running``, ``record_tokens``, ``finish``, ``requeue`` and
``add(validate=False)``, for every policy (those with queues of their own included)."""

from __future__ import annotations

import pytest

from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names

MODEL = LinearLatencyModel(a=0.010, b=1e-4)
SLO_1S = SLO(1.0, 0.05)


def _sched(policy: str, **opts):
    cfg = SchedulerConfig(max_model_len=1024, max_num_batched_tokens=1000,
                          chunk_size=1000 if policy == "sarathi" else None, **opts)
    return make_scheduler(policy, cfg, BlockAllocator(200), MODEL)


def _admitted(plan) -> list[str]:
    return [r.request_id for r, _ in plan.chunks]


@pytest.mark.parametrize("policy", policy_names())
def test_host_requeues_syncs_and_finishes(policy: str) -> None:
    sched = _sched(policy)
    a, b = Request("a", 0.0, 100, 8, SLO_1S), Request("b", 0.0, 100, 8, SLO_1S)
    sched.add(a, 0.0)
    sched.add(b, 0.0)
    assert sorted(_admitted(sched.schedule(0.0))) == ["a", "b"]
    # the host ran the step, sampled a token for each, and lists them in its own order
    for r in (a, b):
        r.num_computed = r.prompt_len
        sched.record_tokens(r, 1, 0.05)
        assert (r.generated, list(r.token_times), r.first_token_time) == (1, [0.05], 0.05)
    sched.sync_running([b, a])
    assert sched.running == [b, a]
    # the host preempted 'a' by itself: it is queued again (the policy's own queue too)
    sched.requeue(a)
    assert a.state is RequestState.WAITING and sched.running == [b] and sched.num_waiting == 1
    assert sched.allocator.num_allocated("a") == 0 and sched.stats.preemptions == 1
    plan = sched.schedule(0.1)
    assert "a" in _admitted(plan) and a.state is RequestState.RUNNING
    # the host ended 'b' by a stop token: out of the scheduler, blocks freed
    assert sched.finish("b", 0.2, "stop") is b
    assert (b.state, b.finish_reason, b.finish_time) == (RequestState.FINISHED, "stop", 0.2)
    assert sched.get("b") is None and sched.allocator.num_allocated("b") == 0
    assert sched.running == [a] and sched.stats.finished == 1
    assert sched.finish("b", 0.3) is None and sched.abort("a", 0.3) is a
    assert not sched.has_work() and sched.allocator.num_used == 0


@pytest.mark.parametrize("policy", policy_names())
def test_admission_the_host_could_not_run_goes_back_in_front(policy: str) -> None:
    sched = _sched(policy)
    a = Request("a", 0.0, 100, 8, SLO_1S)
    sched.add(a, 0.0)
    plan = sched.schedule(0.0)
    sched.requeue(a, plan)
    assert plan.preempted == [a] and a.state is RequestState.WAITING and a.num_computed == 0
    assert _admitted(sched.schedule(0.01)) == ["a"]


def test_record_tokens_counts_from_the_recorded_ones_and_relegates_a_late_first_token() -> None:
    sched = _sched("fairbatching", late="relegate")
    r = Request("r", 0.0, 100, 8, SLO_1S)
    sched.add(r, 0.0)
    sched.schedule(0.0)
    r.generated = 2                     # a host counting in-flight tokens (async scheduling)
    sched.record_tokens(r, 1, 1.5)      # the first token came, past its 1 s TTFT
    assert (r.generated, list(r.token_times), r.ttft_missed, r.relegated) == (1, [1.5], True, True)
    assert r.deadline == pytest.approx(1.0 + 0.05) and sched.stats.relegated == 1   # late: the envelope
    sched.record_tokens(r, 1, 1.6)      # nothing new
    sched.record_tokens(r, 3, 1.7)
    assert list(r.token_times) == [1.5, 1.7, 1.7] and sched.stats.relegated == 1


@pytest.mark.parametrize("policy", policy_names())
def test_add_without_validation_queues_what_the_checks_refuse(policy: str) -> None:
    sched = _sched(policy)
    long = Request("long", 0.0, 1100, 8, SLO(100.0, 0.05))   # past max_model_len
    with pytest.raises(ValueError, match="context limit"):
        sched.add(long, 0.0)
    sched.add(long, 0.0, validate=False)
    assert sched.get("long") is long and sched.num_waiting == 1
    assert _admitted(sched.schedule(0.0)) == ["long"]


@pytest.mark.parametrize("policy", ["fairbatching", "qoserve"])
def test_host_reported_overrun_shortens_time_budgeted_steps(policy: str) -> None:
    """A host without on_step_end reports step times through observe_step; steps 20 %
    over the model shrink the time budget of both policies that size steps by time
    (QoServe is given FairBatching's correction: equally equipped)."""
    sched = _sched(policy)
    r = Request("a", 0.0, 100, 50, SLO_1S)
    sched.add(r, 0.0)
    sched.schedule(0.0)
    r.num_computed = r.prompt_len
    sched.record_tokens(r, 1, 0.05)
    before = sched.schedule(0.05).time_budget
    for _ in range(200):
        sched.observe_step(0.010, 0.012)
    after = sched.schedule(0.05).time_budget
    assert after == pytest.approx(before / 1.2, rel=1e-3)
