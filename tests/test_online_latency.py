"""The online step-time model (refit from measured steps) and how the engine loop feeds it."""

from __future__ import annotations

import random
import time

import pytest

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.latency.online import OnlineLatencyModel
from fairbatch.plan import StepFeatures, StepPlan, StepResult
from fairbatch.request import SLO, Request
from fairbatch.scheduler import SchedulerConfig, make_scheduler
from fairbatch.server.engine_loop import EngineLoop
from fairbatch.server.engine_messages import AddRequests

TRUE = LinearLatencyModel(0.006, 2e-5, 4e-8, 2e-9, 5e-5)


def steps(n: int, seed: int = 0) -> list[StepFeatures]:
    """A serving-like mix: decode batches of various sizes, some with a prefill chunk."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seqs = rng.randint(1, 200)
        ctx = seqs * rng.randint(200, 2000)
        f = StepFeatures(seqs, seqs, ctx, ctx)
        if rng.random() < 0.3:
            k, cached = rng.choice((256, 512, 1024)), rng.randint(0, 2000)
            f.add(cached + k, k)
        out.append(f)
    return out


def test_refit_recovers_a_linear_host():
    online = OnlineLatencyModel(LinearLatencyModel(0.001, 1e-6), refit_every=10**9)
    for f in steps(500):
        online.observe(f, TRUE.predict(f))
    assert online.refit()
    for f in steps(50, seed=1):
        assert online.predict(f) == pytest.approx(TRUE.predict(f), rel=0.01)


def test_refit_is_calibrated_to_the_total_time():
    """A tenth of the steps take 60 % longer (a pause, a slow hand-off): a relative-error fit
    follows the typical step, the calibrated one predicts the window's total, which is what
    the wall clock (and every deadline) sees."""
    online = OnlineLatencyModel(TRUE, refit_every=10**9)
    samples = [(f, TRUE.predict(f) * (1.6 if i % 10 == 0 else 1.0)) for i, f in enumerate(steps(1000))]
    for f, t in samples:
        online.observe(f, t)
    assert online.refit()
    measured = sum(t for _, t in samples)
    predicted = sum(online.predict(f) for f, _ in samples)
    assert predicted == pytest.approx(measured, rel=1e-9)
    typical = LinearLatencyModel.fit(samples)
    assert sum(typical.predict(f) for f, _ in samples) < 0.97 * measured   # what calibration corrects
    assert online.current.meta["calibration"] > 1.03


def test_refit_needs_prefills_in_the_window():
    online = OnlineLatencyModel(TRUE, refit_every=10**9)
    for f in steps(200):
        if f.new_tokens == f.num_seqs:     # decodes only: a token's cost and a sequence's are one
            online.observe(f, TRUE.predict(f))
    assert not online.refit() and online.current is TRUE


class _SlowExecutor:
    """Steps that take ``seconds`` of wall time each."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def execute(self, plan: StepPlan) -> StepResult:
        time.sleep(self.seconds)
        return StepResult(self.seconds, {r.request_id: 7 for r, _ in plan.chunks})

    def release(self, request: Request) -> None:
        pass


def _serve(inst: Instance, intake_s: float) -> tuple[EngineLoop, list[Request]]:
    """Four requests through an engine loop whose intake between steps takes at least
    ``intake_s`` (the time a served host spends outside the step); runs until they finish."""
    loop = EngineLoop(inst, [].append, idle_wait=0.01)
    reqs = [Request(f"r{i}", 0.0, 40, 12, SLO(1.0, 0.05)) for i in range(4)]
    calls = {"n": 0}

    def receive(timeout: float):
        calls["n"] += 1
        if calls["n"] == 1:
            return [AddRequests(tuple(reqs))]
        time.sleep(intake_s)              # a slow intake between steps
        return []

    loop.run(receive, stopping=lambda: calls["n"] > 1 and not inst.has_work())
    return loop, reqs


def test_engine_loop_charges_a_step_until_the_next_one_starts():
    """Time between steps (taking in commands here) is part of what a step costs the
    requests waiting on it: the busy counter and the refit window see it."""
    sched = make_scheduler("sarathi", SchedulerConfig(max_num_batched_tokens=256), BlockAllocator(256, 16),
                           OnlineLatencyModel(LinearLatencyModel(0.002, 1e-6), refit_every=10**9))
    inst = Instance(sched, _SlowExecutor(0.002))
    loop, reqs = _serve(inst, intake_s=0.003)
    assert all(r.generated == 12 for r in reqs)
    assert loop.steps_run >= 12
    # every step but the last is followed by a 3 ms intake before the next starts
    assert loop.busy_seconds >= loop.step_seconds + 0.003 * (loop.steps_run - 1)
    online = sched.latency
    assert online.num_observed == loop.steps_run
    assert sum(t for _, t in online._samples) == pytest.approx(loop.busy_seconds)


class _ModelExecutor:
    """Steps that take exactly what ``model`` predicts, and say so."""

    def __init__(self, model: LinearLatencyModel) -> None:
        self.model = model

    def execute(self, plan: StepPlan) -> StepResult:
        seconds = self.model.predict(plan.features)
        time.sleep(seconds)
        return StepResult(seconds, {r.request_id: 7 for r, _ in plan.chunks})

    def release(self, request: Request) -> None:
        pass


@pytest.mark.parametrize("policy", ["fairbatching", "qoserve"])
def test_the_overrun_correction_sees_the_served_cycle_not_the_step_alone(policy: str):
    """Served, a step costs its waiting requests until the next step starts: the policies
    that shorten their steps while the model is overrun compare that cycle (the clock the
    refit uses too) with the prediction. Here every step runs exactly as predicted, and a
    slow intake of 5 ms follows it: the correction must see the overrun, where the
    executor's own duration says there is none."""
    model = LinearLatencyModel(0.002, 1e-6)
    sched = make_scheduler(policy, SchedulerConfig(), BlockAllocator(256, 16), model)
    inst = Instance(sched, _ModelExecutor(model))
    loop, reqs = _serve(inst, intake_s=0.005)
    assert all(r.generated == 12 for r in reqs)
    assert sched.host_reports_steps
    # every cycle ran >= 2x its ~2 ms prediction: after 12 steps the moving average
    # (gain 0.05, from 1) is above 1 + (1 - 0.95^12) = 1.46; the steps alone say exactly 1
    assert loop.steps_run >= 12
    assert sched._budget.overrun > 1.4
