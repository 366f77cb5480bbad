"""vLLM's priority scheduling (``vllm-priority``): waiting order by (priority, arrival),
the lowest-priority running request preempted when KV runs out, and the priority that
requests get from their SLO class (simulator) or the API's ``priority`` field (server)."""

from __future__ import annotations

import random

import pytest

from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepFeatures, StepResult
from fairbatch.request import SLO, Request
from fairbatch.scheduler import SchedulerConfig, make_scheduler
from fairbatch.workload import TraceEntry, make_requests, slo_priorities

MODEL = LinearLatencyModel(a=0.010, b=1e-4)     # 10 ms per step + 0.1 ms per token
SLO_1S = SLO(1.0, 0.05)


def _sched(policy: str, num_blocks: int = 1000, **opts):
    opts.setdefault("late", "serve")
    cfg = SchedulerConfig(max_model_len=4096, max_num_batched_tokens=opts.pop("budget", 500), **opts)
    return make_scheduler(policy, cfg, BlockAllocator(num_blocks, 16), MODEL)


def _ids(items) -> list[str]:
    """Request ids of a plan's chunks or of a list of requests."""
    return [(x[0] if isinstance(x, tuple) else x).request_id for x in items]


def _step(sched, plan, now: float) -> float:
    now += MODEL.predict(plan.features)
    sched.on_step_end(plan, StepResult(0.0), now)
    return now


@pytest.mark.parametrize("policy, first", [("vllm-priority", "high"), ("vllm", "low")])
def test_higher_priority_prompt_is_admitted_first_even_if_it_arrived_later(policy: str, first: str) -> None:
    sched = _sched(policy)                              # room for one 500-token prompt
    sched.add(Request("low", 0.0, 500, 5, SLO_1S, priority=1), 0.0)
    sched.add(Request("high", 0.5, 500, 5, SLO_1S, priority=0), 0.5)
    sched.add(Request("lowest", 0.2, 500, 5, SLO_1S, priority=7), 0.2)
    assert _ids(sched.schedule(0.6).chunks) == [first]
    if policy == "vllm-priority":
        assert [r.request_id for r in sched.waiting] == ["low", "lowest"]


def _kv_pressure(policy: str, **opts):
    """Running [H (priority 0), L (priority 2), M (priority 1)] in 5 blocks of 16 slots: in
    the third step M's decode needs a block and none is free."""
    sched = _sched(policy, num_blocks=5, **opts)
    sched.add(Request("H", 0.0, 16, 20, SLO_1S, priority=0), 0.0)
    sched.add(Request("L", 0.0, 16, 20, SLO_1S, priority=2), 0.0)
    now = _step(sched, sched.schedule(0.0), 0.0)
    sched.add(Request("M", now, 16, 20, SLO_1S, priority=1), now)
    plan = sched.schedule(now)
    assert sorted(_ids(plan.chunks)) == ["H", "L", "M"] and not plan.preempted
    now = _step(sched, plan, now)
    return sched, sched.schedule(now)


def test_kv_pressure_preempts_the_lowest_priority_running_request() -> None:
    sched, plan = _kv_pressure("vllm-priority")
    # L was already in the step: it gives its token back and M gets its blocks
    assert _ids(plan.preempted) == ["L"] and _ids(plan.chunks) == ["H", "M"]
    assert [r.request_id for r in sched.running] == ["H", "M"]
    recount = StepFeatures.of_chunks(plan.chunks)
    f = plan.features
    assert (f.num_seqs, f.new_tokens, f.context_tokens) == (recount.num_seqs, recount.new_tokens, recount.context_tokens)
    assert f.attention_pairs == pytest.approx(recount.attention_pairs)
    assert sched.allocator.num_allocated("L") == 0 and sched.num_waiting == 1
    # vllm preempts the newest, here the request that needs the block
    _, fcfs = _kv_pressure("vllm")
    assert _ids(fcfs.preempted) == ["M"] and _ids(fcfs.chunks) == ["H", "L"]


def test_kv_pressure_preempts_a_relegated_request_first() -> None:
    """Running [A (priority 0), X (priority 2), R (priority 0, relegated)] in 3 blocks: A's
    first decode needs a block. R goes, not the lower-priority X."""
    sched = _sched("vllm-priority", num_blocks=3, late="relegate")
    sched.add(Request("A", 0.0, 16, 20, SLO_1S, priority=0), 0.0)
    sched.add(Request("X", 0.0, 8, 20, SLO_1S, priority=2), 0.0)
    sched.add(Request("R", 0.0, 8, 20, SLO(0.001, 0.05), priority=0), 0.0)   # cannot make 1 ms
    assert sched.get("R").relegated
    plan = sched.schedule(0.0)
    assert _ids(plan.chunks) == ["A", "X", "R"]          # relegated prompts last
    plan = sched.schedule(_step(sched, plan, 0.0))
    assert _ids(plan.preempted) == ["R"] and _ids(plan.chunks) == ["A", "X"]


def test_a_step_never_comes_back_empty_when_the_lowest_priority_request_goes_first() -> None:
    """Running [L (priority 3), H (priority 0)] in 2 blocks: L, first in the step, needs a
    block and is the victim itself. vLLM runs that empty step and schedules again; the
    plan is the second schedule's, H alone (an empty plan would stall the instance)."""
    sched = _sched("vllm-priority", num_blocks=2)
    sched.add(Request("L", 0.0, 8, 20, SLO_1S, priority=3), 0.0)
    now = _step(sched, sched.schedule(0.0), 0.0)
    sched.add(Request("H", now, 8, 20, SLO_1S, priority=0), now)
    while True:
        plan = sched.schedule(now)
        if plan.preempted:
            break
        assert _ids(plan.chunks) == ["L", "H"][:len(plan.chunks)]
        now = _step(sched, plan, now)
    assert _ids(plan.preempted) == ["L"] and _ids(plan.chunks) == ["H"]
    assert plan.features.num_seqs == 1 and plan.features.new_tokens == 1


def _workload(seed: int, priority: int) -> list[Request]:
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for i in range(60):
        t += rng.choice([0.0, 0.0, rng.expovariate(20.0)])   # ties in arrival too
        reqs.append(Request(f"r{i}", t, rng.randint(16, 600), rng.randint(1, 80), SLO_1S, priority=priority))
    return reqs


def _trace(policy: str, reqs: list[Request], num_blocks: int, late: str) -> tuple[list, int]:
    """Every plan of a run, driven step by step: (chunks, preempted) by request id."""
    sched = _sched(policy, num_blocks=num_blocks, budget=256, max_num_seqs=16, late=late)
    pending = sorted(reqs, key=lambda r: r.arrival)
    now, out, j = 0.0, [], 0
    while j < len(pending) or sched.has_work():
        while j < len(pending) and pending[j].arrival <= now:
            sched.add(pending[j], now)
            j += 1
        if not sched.has_work():
            now = pending[j].arrival
            continue
        plan = sched.schedule(now)
        out.append(([(r.request_id, k) for r, k in plan.chunks], _ids(plan.preempted)))
        now = _step(sched, plan, now)
    return out, sched.stats.preemptions


@pytest.mark.parametrize("late", ["serve", "relegate", "reject"])
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_priorities_give_exactly_vllm_plans(seed: int, late: str) -> None:
    base, n_base = _trace("vllm", _workload(seed, 0), num_blocks=60, late=late)
    for priority in (0, 3):
        plans, n = _trace("vllm-priority", _workload(seed, priority), num_blocks=60, late=late)
        assert plans == base and n == n_base
    assert n_base > 0     # the workload does preempt


@pytest.mark.parametrize("late", ["relegate", "reject"])
def test_relegated_prompts_go_after_every_on_time_one(late: str) -> None:
    sched = _sched("vllm-priority", late=late)
    sched.add(Request("late", 0.0, 500, 5, SLO_1S, priority=0), 0.0)       # highest priority
    sched.add(Request("fresh", 9.9, 500, 5, SLO_1S, priority=5), 9.9)
    plan = sched.schedule(10.0)      # "late" can no longer make its TTFT
    assert _ids(plan.chunks) == ["fresh"]
    if late == "relegate":
        assert sched.get("late").relegated and list(sched.relegated) == [sched.get("late")]
    serve = _sched("vllm-priority")
    serve.add(Request("late", 0.0, 500, 5, SLO_1S, priority=0), 0.0)
    serve.add(Request("fresh", 9.9, 500, 5, SLO_1S, priority=5), 9.9)
    assert _ids(serve.schedule(10.0).chunks) == ["late"]


def test_abort_and_load_see_the_priority_queue() -> None:
    sched = _sched("vllm-priority", budget=16)
    for i, p in enumerate([3, 1, 2]):
        sched.add(Request(f"r{i}", 0.0, 100, 5, SLO_1S, priority=p), 0.0)
    assert [r.request_id for r in sched.waiting] == ["r1", "r2", "r0"]
    assert sched.abort("r2", 0.0) is not None
    assert [r.request_id for r in sched.waiting] == ["r1", "r0"]
    assert sched.load(0.0).queued_prefill_tokens == 200
    assert _ids(sched.schedule(0.0).chunks) == ["r1"]


# --- where priorities come from --------------------------------------------------------------
def test_slo_classes_map_to_priorities_tightest_first() -> None:
    inter, batch, mid = SLO(0.5, 0.03, "interactive"), SLO(5.0, 0.15, "batch"), SLO(0.5, 0.1, "mid")
    slos = [batch, inter, mid, batch, inter]
    assert slo_priorities(slos) == [2, 0, 1, 2, 0]
    entries = [TraceEntry(float(i), 10, 5) for i in range(len(slos))]
    assert [r.priority for r in make_requests(entries, slos)] == [2, 0, 1, 2, 0]
    assert [r.priority for r in make_requests(entries, SLO_1S)] == [0] * 5      # one class: all 0
    assert [r.priority for r in make_requests(entries, slos, priorities=[4] * 5)] == [4] * 5
    with pytest.raises(ValueError, match="priorities"):
        make_requests(entries, slos, priorities=[0])


def test_api_priority_reaches_the_request() -> None:
    pytest.importorskip("pydantic")
    from fairbatch.engine.params import SamplingParams
    from fairbatch.server.model import ModelInfo, ServedModel
    from fairbatch.server.protocol import CompletionRequest

    info = ModelInfo(name="m", model="m", policy="vllm-priority", vocab_size=512, max_model_len=256,
                     ttft_slo=1.0, tpot_slo=0.05, device="cpu", num_blocks=64, block_size=16,
                     tokenizer_dir=None)
    model = ServedModel(info)
    for body, want in (({"prompt": [1, 2, 3]}, 0), ({"prompt": [1, 2, 3], "priority": -5}, -5),
                       ({"prompt": [1, 2, 3], "priority": 9, "slo": {"class": "batch"}}, 9)):
        parsed = CompletionRequest.model_validate(body)
        req = model.make_request("x", [1, 2, 3], SamplingParams(max_tokens=4), slo=model.default_slo,
                                 priority=parsed.priority)
        assert req.priority == want
