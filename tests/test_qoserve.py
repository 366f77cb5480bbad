"""QoServe (Niyama) baseline: hand-built scenarios for the behaviour the paper describes."""

from __future__ import annotations

import pytest

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepResult
from fairbatch.request import SLO, Request
from fairbatch.scheduler import SchedulerConfig, make_scheduler
from fairbatch.sim import SimExecutor, simulate

MODEL = LinearLatencyModel(a=0.005, b=4e-5, c=2e-7, d=1e-10, e=2e-5)


def _sched(**opts):
    opts.setdefault("late", "serve")
    cfg = SchedulerConfig(max_model_len=8192, **opts)
    return make_scheduler("qoserve", cfg, BlockAllocator(4000, 16), MODEL)


def _step(sched, now: float) -> tuple[list, float]:
    """Run one step at ``now``; returns its chunks and when it ends."""
    plan = sched.schedule(now)
    end = now + plan.predicted_time
    sched.on_step_end(plan, StepResult(plan.predicted_time), end)
    return plan.chunks, end


def _decoding(sched, rid: str, now: float, slo: SLO = SLO(1.0, 0.05), prompt: int = 100) -> tuple[Request, float]:
    """A request that has just produced its first token."""
    req = Request(rid, now, prompt, 50, slo)
    sched.add(req, now)
    _, end = _step(sched, now)
    assert req.generated == 1
    return req, end


def test_prefill_chunk_is_the_largest_whose_step_times_safety_fits_the_least_decode_slack() -> None:
    ks = []
    for lag in (0.0, 0.01, 0.02):
        sched = _sched()
        d, t = _decoding(sched, "d", 0.0)
        now = t + lag
        p = Request("p", now, 4000, 5, SLO(5.0, 0.05))
        sched.add(p, now)
        plan = sched.schedule(now)
        assert [r.request_id for r, _ in plan.chunks] == ["d", "p"]        # decodes first
        k = plan.chunks[1][1]
        slack = d.deadline - now
        safety = sched.config.qoserve_safety_factor
        assert plan.time_budget == pytest.approx(slack / safety)
        assert MODEL.predict(plan.features) * safety <= slack
        bigger = plan.features.with_chunk(p.num_computed + k, sched.config.chunk_align)
        assert MODEL.predict(bigger) * safety > slack                     # the largest aligned chunk
        assert k % sched.config.chunk_align == 0
        ks.append(k)
    assert ks[0] > ks[1] > ks[2] > 128                                    # less slack, smaller chunk


def test_chunk_bounds_without_decodes_and_without_slack() -> None:
    # no decode running: the step-size cap alone (2,552 tokens, or the token budget)
    sched = _sched()
    sched.add(Request("p", 0.0, 6000, 5, SLO(5.0, 0.05)), 0.0)
    plan = sched.schedule(0.0)
    assert plan.chunks[0][1] == 2552 and plan.time_budget is None
    sched = _sched(max_num_batched_tokens=1000)
    sched.add(Request("p", 0.0, 6000, 5, SLO(5.0, 0.05)), 0.0)
    assert sched.schedule(0.0).chunks[0][1] == 1000
    # a decode already past its deadline: the step still holds the 128-token floor
    sched = _sched()
    d, t = _decoding(sched, "d", 0.0)
    sched.add(Request("p", t, 6000, 5, SLO(5.0, 0.05)), t)
    plan = sched.schedule(d.deadline + 0.01)
    assert plan.time_budget < 0
    assert [k for _, k in plan.chunks] == [1, 127]                    # 128 tokens in all


def test_hybrid_order_prefers_a_short_prompt_to_a_long_one_with_a_slightly_earlier_deadline() -> None:
    def first(weight: float | None = None, **kw) -> list[tuple[str, int]]:
        opts = {} if weight is None else {"qoserve_priority_weight": weight}
        sched = _sched(max_num_batched_tokens=512, **opts)
        sched.add(Request("long", 0.0, 3000, 5, SLO(1.0, 0.05)), 0.0)
        sched.add(Request("short", 0.1, 300, 5, SLO(1.0, 0.05)), 0.1)
        return [(r.request_id, k) for r, k in sched.schedule(0.1).chunks]

    # deadlines 1.0 and 1.1 s; 0.008 s per remaining token: 25.0 vs 3.5
    assert first() == [("short", 300), ("long", 212)]
    assert first(weight=0.0) == [("long", 512)]                       # pure EDF

    # a deadline far enough ahead still loses to the long prompt: it is a hybrid, not SRPF
    sched = _sched(max_num_batched_tokens=512)
    sched.add(Request("long", 0.0, 1000, 5, SLO(1.0, 0.05)), 0.0)
    sched.add(Request("short", 0.1, 100, 5, SLO(10.0, 0.05)), 0.1)
    assert [r.request_id for r, _ in sched.schedule(0.1).chunks] == ["long"]


def test_a_running_partial_prefill_is_overtaken_by_a_shorter_prompt() -> None:
    sched = _sched(max_num_batched_tokens=512)
    long = Request("long", 0.0, 3000, 5, SLO(1.0, 0.05))
    sched.add(long, 0.0)
    chunks, t = _step(sched, 0.0)
    assert chunks == [(long, 512)]
    sched.add(Request("short", t, 200, 5, SLO(1.0, 0.05)), t)
    assert [(r.request_id, k) for r, k in sched.schedule(t).chunks] == [("short", 200), ("long", 312)]


def test_relegated_prompt_goes_after_an_on_time_one_even_when_its_key_is_smaller() -> None:
    def order(late: str) -> list[str]:
        sched = _sched(late=late, max_num_batched_tokens=2000)
        sched.add(Request("late", 0.0, 100, 5, SLO(1.0, 0.05)), 0.0)      # key 1.8 s, but TTFT lost
        sched.add(Request("fresh", 9.9, 2000, 5, SLO(1.0, 0.05)), 9.9)    # key 26.9 s
        return [r.request_id for r, _ in sched.schedule(10.0).chunks]

    assert order("serve") == ["late", "fresh"]
    assert order("relegate") == ["fresh"]


def test_relegated_decode_runs_after_the_prefills_sets_no_budget_and_is_never_starved() -> None:
    sched = _sched(late="relegate")
    ok = Request("ok", 0.0, 100, 50, SLO(1.0, 0.05))
    lost = Request("lost", 0.0, 16, 50, SLO(0.001, 0.05))    # its first token cannot be on time
    sched.add(ok, 0.0)
    sched.add(lost, 0.0)
    _, t = _step(sched, 0.0)
    assert ok.generated == lost.generated == 1 and lost.relegated and not ok.relegated
    assert lost.deadline < ok.deadline       # it would set a tighter budget if it counted

    sched.add(Request("p", t, 200, 5, SLO(1.0, 0.05)), t)
    plan = sched.schedule(t)
    assert [r.request_id for r, _ in plan.chunks] == ["ok", "p", "lost"]
    assert plan.time_budget == pytest.approx((ok.deadline - t) / sched.config.qoserve_safety_factor)
    sched.on_step_end(plan, StepResult(plan.predicted_time), t + plan.predicted_time)

    # a relegated decode whose last token is failed_decode_gap TPOTs old joins the
    # on-time decodes, ahead of any prefill, even with no slack left for the step
    now = lost.token_times[-1] + sched.config.failed_decode_gap * lost.pace + 0.001
    sched.add(Request("q", now, 3000, 5, SLO(5.0, 0.05)), now)
    plan = sched.schedule(now)
    ids = [r.request_id for r, _ in plan.chunks]
    assert ids.index("lost") < ids.index("q")


@pytest.mark.parametrize("late", ["serve", "relegate"])
def test_light_mixed_load_meets_every_requests_own_slo(late: str) -> None:
    classes = [SLO(1.0, 0.05, "chat"), SLO(0.4, 0.025, "tight"), SLO(4.0, 0.2, "batch")]
    sched = _sched(late=late)
    reqs = [Request(f"r{i}", i * 0.3, 300 + 53 * (i % 9), 20 + i % 13, classes[i % 3]) for i in range(90)]
    out = simulate(reqs, [Instance(sched, SimExecutor(MODEL))])
    assert out.unfinished == 0
    for r in reqs:
        assert r.first_token_time - r.arrival <= r.slo.ttft
        assert (r.finish_time - r.first_token_time) / (r.generated - 1) <= r.slo.tpot
    assert sched.stats.relegated == 0 and sched._heap.head() is None and len(sched._heap) == 0


@pytest.mark.parametrize("opts", [{"qoserve_safety_factor": 0.9}, {"qoserve_priority_weight": -0.001},
                                  {"qoserve_min_step_tokens": 3000}, {"qoserve_max_step_tokens": 0}])
def test_config_rejects_values_it_cannot_run_with(opts: dict) -> None:
    with pytest.raises(ValueError, match="qoserve"):
        SchedulerConfig(**opts).validate()
