"""The late watch follows a waiting prompt's work left: a prompt whose cached prefix is
given back (and evicted) is found late as soon as its new latest start passes, not at the
one it had while it held the prefix; one whose given-back prefix is still cached takes it
again rather than be given up on; a host that refreshes a waiting request's counts itself
(vLLM) reports it through ``waiting_changed`` and gets the same."""

from __future__ import annotations

import pytest

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator, trace_block_hashes
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepResult
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.sim import SimExecutor, simulate

MODEL = LinearLatencyModel(a=0.010, b=1e-3)   # 10 ms a step + 1 ms a token: prefills dominate
NAMES = 64                                    # tokens per trace hash id


def _sched(policy: str, late: str, num_blocks: int = 8):
    # every policy admits ``c`` first: by arrival, or by deadline (QoServe's work term off)
    extra = {"qoserve_priority_weight": 0.0} if policy == "qoserve" else {}
    cfg = SchedulerConfig(max_model_len=128, max_num_seqs=1, late=late,
                          chunk_size=128 if policy == "sarathi" else None, **extra)
    alloc = BlockAllocator(num_blocks, 16, prefix_caching=True)
    return make_scheduler(policy, cfg, alloc, MODEL), alloc


def _warm(sched) -> None:
    """Leave the 64-token prefix of ``a``'s prompt cached."""
    warm = Request("warm", 0.0, 65, 1, SLO(1.0, 0.05))
    warm.block_hashes = trace_block_hashes([7], 65, 16, NAMES)
    simulate([warm], [Instance(sched, SimExecutor(MODEL))])


def _run(sched, plan, now: float) -> None:
    sched.on_step_end(plan, StepResult(duration=MODEL.predict(plan.features)), now)


@pytest.mark.parametrize("late", ["relegate", "reject"])
@pytest.mark.parametrize("policy", policy_names())
def test_a_prompt_that_gave_its_prefix_back_is_found_late_at_its_new_latest_start(policy: str, late: str) -> None:
    """``a`` (deadline 1.2 s) holds its 64-token prefix: 1 token left, latest start 1.189 s.
    ``c`` needs all 8 blocks, so ``a`` gives its prefix back and it is evicted: 65 tokens
    left (75 ms), latest start 1.125 s. At the next step (1.13 s) ``a`` is late; the watch
    used to look at it only at 1.189 s and admit it meanwhile."""
    sched, alloc = _sched(policy, late)
    _warm(sched)
    now = 1.0
    c = Request("c", now, 120, 1, SLO(0.15, 0.05))     # first in every policy's order
    a = Request("a", now, 65, 1, SLO(0.2, 0.05))
    a.block_hashes = trace_block_hashes([7], 65, 16, NAMES)
    sched.add(c, now)
    sched.add(a, now)
    assert a.num_computed == 64
    plan = sched.schedule(now)
    assert [r for r, _ in plan.chunks] == [c]
    assert a.num_computed == 0 and alloc.num_cached == 0   # given back, evicted by c
    _run(sched, plan, now + 0.13)
    assert c.state is RequestState.FINISHED
    plan = sched.schedule(now + 0.13)
    if late == "reject":
        assert a.state is RequestState.REJECTED and plan.rejected == [a]
    else:
        assert a.relegated and plan.rejected == []   # (admitted all the same: nothing else waits)
    alloc.check_invariants()


@pytest.mark.parametrize("policy", policy_names())
def test_a_prompt_whose_given_back_prefix_is_still_cached_takes_it_again(policy: str) -> None:
    """As above with 11 blocks: ``c`` needs 8, so ``a`` gives its 4 back and ``c`` evicts
    only the last one. At 1.13 s ``a``'s latest start without a prefix (1.125 s) has
    passed, but it takes the 48 tokens still cached again (17 left: 1.163 s) and stays on
    time: without them its floor is no lower bound."""
    sched, alloc = _sched(policy, "reject", num_blocks=11)
    _warm(sched)
    now = 1.0
    c = Request("c", now, 120, 1, SLO(0.15, 0.05))
    a = Request("a", now, 65, 1, SLO(0.2, 0.05))
    a.block_hashes = trace_block_hashes([7], 65, 16, NAMES)
    sched.add(c, now)
    sched.add(a, now)
    plan = sched.schedule(now)
    assert [r for r, _ in plan.chunks] == [c]
    assert a.num_computed == 0 and alloc.cached_blocks(a.block_hashes) == 3
    _run(sched, plan, now + 0.13)
    plan = sched.schedule(now + 0.13)
    assert a.state is RequestState.RUNNING and not a.relegated and not plan.rejected
    assert [r for r, _ in plan.chunks] == [a] and a.num_cached_tokens == 48
    alloc.check_invariants()


@pytest.mark.parametrize("policy", policy_names())
def test_a_host_refreshing_a_waiting_count_moves_its_latest_start(policy: str) -> None:
    """A host that owns the counts (vLLM, no block names here) raises a waiting prompt's
    work left by itself and reports it: the prompt is found late at the next step."""
    sched, _ = _sched(policy, "reject", num_blocks=32)
    now = 1.0
    c = Request("c", now, 120, 1, SLO(0.15, 0.05))
    a = Request("a", now, 65, 1, SLO(0.2, 0.05))
    a.num_computed = 64          # the host's count: a prefix hit of its own cache
    sched.add(c, now)
    sched.add(a, now)
    plan = sched.schedule(now)
    assert [r for r, _ in plan.chunks] == [c]
    a.num_computed = 0           # the host dropped the hit
    sched.waiting_changed(a)
    _run(sched, plan, now + 0.13)
    plan = sched.schedule(now + 0.13)
    assert a.state is RequestState.REJECTED and plan.rejected == [a]


def _preempting_pair(policy: str, ttft: float, hashed: bool):
    """``d`` decodes and grows its KV until ``p``, a 100-token prompt prefilled in chunks
    of at most 32 tokens, is preempted: 8 blocks of 16 do not hold both. ``hashed``: ``p``
    names its blocks, but the cache holds none of them when it is preempted."""
    cfg = SchedulerConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, late="reject",
                          chunk_size=32 if policy == "sarathi" else None)
    sched = make_scheduler(policy, cfg, BlockAllocator(8, 16), MODEL)
    d = Request("d", 0.0, 16, 100, SLO(10.0, 1.0))
    p = Request("p", 0.0, 100, 1, SLO(ttft, 1.0))
    if hashed:
        p.block_hashes = trace_block_hashes([99], 100, 16, NAMES)
    sched.add(d, 0.0)
    sched.add(p, 0.0)
    return sched, p


def _steps_until(sched, p, now: float = 0.0):
    """Run steps until ``p`` is preempted; returns that step's plan and start time."""
    while sched.has_work():
        plan = sched.schedule(now)
        if p in plan.preempted:
            return plan, now
        duration = MODEL.predict(plan.features)
        now += duration
        sched.on_step_end(plan, StepResult(duration=duration), now)
    return None, now


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("policy", ["vllm", "vllm-priority", "sarathi"])
def test_a_preempted_partial_prefill_is_found_late_at_its_new_latest_start(policy: str, hashed: bool) -> None:
    """A partial prefill that is preempted (no prefix cache: it starts over) has its whole
    prompt to compute again, so its latest start moves back by the tokens it had done. With
    its deadline 70 ms after the preemption, it had 32 tokens left (latest start 38 ms after
    it) and now 100 (40 ms before it): the next step must refuse it, not compute it.
    (FairBatching and QoServe share this preemption path; with that deadline they finish
    ``p`` before ``d`` runs short, so this pair does not preempt it there.)"""
    sched, p = _preempting_pair(policy, ttft=100.0, hashed=hashed)
    plan, at = _steps_until(sched, p)
    assert plan is not None, "the scenario no longer preempts the prompt"
    sched, p = _preempting_pair(policy, ttft=at + 0.07, hashed=hashed)
    plan, now = _steps_until(sched, p)
    assert plan is not None and now == at and p.num_computed == 0
    duration = MODEL.predict(plan.features)
    assert duration < 0.038   # the next step starts before the latest start it had
    sched.on_step_end(plan, StepResult(duration=duration), now + duration)
    plan = sched.schedule(now + duration)
    assert p.state is RequestState.REJECTED and plan.rejected == [p]
    assert all(r is not p for r, _ in plan.chunks)
    sched.allocator.check_invariants()
