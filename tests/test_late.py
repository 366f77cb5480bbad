"""Late-request handling (``SchedulerConfig.late``): one mechanism, the same for every
policy. A prompt is late once it cannot finish its prefill by its first-token deadline
even in a step of its own."""

from __future__ import annotations

import pytest

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.metrics import record_from_request, summarize
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.sim import SimExecutor, simulate

MODEL = LinearLatencyModel(a=0.010, b=1e-4)     # 10 ms per step + 0.1 ms per token
SLO_1S = SLO(1.0, 0.05)


def _sched(policy: str, **opts):
    cfg = SchedulerConfig(max_model_len=4096, max_num_batched_tokens=500,
                          chunk_size=500 if policy == "sarathi" else None, **opts)
    return make_scheduler(policy, cfg, BlockAllocator(1000), MODEL)


def _first_admitted(policy: str, **opts) -> str:
    """Two waiting prompts, room for one: 'late' can no longer make its TTFT, 'fresh' can."""
    sched = _sched(policy, **opts)
    sched.add(Request("late", 0.0, 500, 5, SLO_1S), 0.0)
    sched.add(Request("fresh", 9.9, 500, 5, SLO_1S), 9.9)
    plan = sched.schedule(10.0)
    assert len(plan.chunks) == 1
    return plan.chunks[0][0].request_id


@pytest.mark.parametrize("policy", policy_names())
def test_relegate_serves_prompts_that_can_still_make_their_ttft_first(policy: str) -> None:
    assert _first_admitted(policy, late="serve") == "late"        # FCFS and EDF alike
    assert _first_admitted(policy, late="relegate") == "fresh"
    assert _first_admitted(policy, late="relegate", late_deadline_factor=5.0) == "late"  # waited 10 TTFTs
    assert _first_admitted(policy, late="relegate", late_deadline_factor=20.0) == "fresh"


@pytest.mark.parametrize("policy", policy_names())
def test_reject_refuses_a_prompt_while_it_waits(policy: str) -> None:
    sched = _sched(policy, late="reject")
    late = Request("late", 0.0, 500, 5, SLO_1S)
    sched.add(late, 0.0)
    sched.add(Request("fresh", 9.9, 500, 5, SLO_1S), 9.9)
    plan = sched.schedule(10.0)
    assert [r.request_id for r, _ in plan.chunks] == ["fresh"]
    assert plan.rejected == [late] and sched.schedule(10.1).rejected == []
    assert late.state is RequestState.REJECTED and late.finish_reason == "rejected"
    assert sched.get("late") is None and sched.stats.rejected == 1


@pytest.mark.parametrize("policy", policy_names())
def test_reject_at_arrival_when_even_an_idle_instance_cannot_make_it(policy: str) -> None:
    sched = _sched(policy, late="reject")
    # 4,000 tokens take 0.41 s alone: a 0.3 s TTFT cannot be met
    hopeless = Request("hopeless", 0.0, 4000, 5, SLO(0.3, 0.05))
    sched.add(hopeless, 0.0)
    assert hopeless.state is RequestState.REJECTED      # the caller sees it at once
    assert not sched.has_work() and sched.schedule(0.0).rejected == []
    # relegate keeps it, behind everyone
    sched = _sched(policy, late="relegate")
    sched.add(Request("hopeless", 0.0, 4000, 5, SLO(0.3, 0.05)), 0.0)
    assert sched.get("hopeless").relegated and sched.num_waiting == 1


CHUNKING = [p for p in policy_names() if p != "prefill-first"]   # prefill-first runs prompts whole


@pytest.mark.parametrize("policy", CHUNKING)
def test_reject_frees_a_partial_prefill_but_never_a_streaming_request(policy: str) -> None:
    alloc = BlockAllocator(1000)
    cfg = SchedulerConfig(max_model_len=8192, max_num_batched_tokens=256,
                          chunk_size=256 if policy == "sarathi" else None, late="reject")
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    inst = Instance(sched, SimExecutor(MODEL))
    # 2,000 tokens alone: 0.21 s; in 256-token chunks of ~36 ms each it needs ~0.28 s
    slow = Request("slow", 0.0, 2000, 5, SLO(0.25, 0.05))
    inst.add(slow, 0.0)
    now = 0.0
    while sched.has_work():
        _, res, _ = inst.step(now)
        now += res.duration
        if slow.state is RequestState.REJECTED:
            break
    assert slow.state is RequestState.REJECTED and slow.generated == 0
    assert alloc.num_free == alloc.num_blocks          # its partial KV was freed
    # a request whose first token came late keeps streaming: it is never refused
    streaming = Request("s", now, 16, 50, SLO(0.001, 0.05))
    sched2 = make_scheduler(policy, SchedulerConfig(max_model_len=8192, late="relegate"), BlockAllocator(100), MODEL)
    inst2 = Instance(sched2, SimExecutor(MODEL))
    out = simulate([streaming], [inst2])
    assert out.unfinished == 0 and streaming.generated == 50 and streaming.relegated


@pytest.mark.parametrize("policy", policy_names())
def test_attainment_counts_every_refused_request_as_a_miss(policy: str) -> None:
    sched = _sched(policy, late="reject")
    burst = [Request(f"r{i}", 0.0, 480, 3, SLO_1S) for i in range(40)]   # ~20 s of prefill
    out = simulate(burst, [Instance(sched, SimExecutor(MODEL))])
    refused = [r for r in burst if r.state is RequestState.REJECTED]
    assert out.unfinished == 0 and 0 < len(refused) < len(burst)
    s = summarize([record_from_request(r) for r in burst])
    assert s["rejected"] == len(refused)
    assert s["slo_attainment"] <= 1 - len(refused) / len(burst)
    assert s["completed"] == len(burst) - len(refused)


def test_unknown_late_mode_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="late must be one of serve, relegate, reject"):
        _sched("vllm", late="drop")
