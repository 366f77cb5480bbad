"""The simulator's executor: a step takes what the latency model predicts."""

from __future__ import annotations

from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request


class SimExecutor:
    """``model`` is the simulated hardware; it may differ from the model the scheduler
    plans with (to study mis-prediction), but by default they are the same."""

    __slots__ = ("model", "busy_time", "steps")

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.busy_time = 0.0
        self.steps = 0

    def execute(self, plan: StepPlan) -> StepResult:
        d = self.model.predict(plan.features)
        self.busy_time += d
        self.steps += 1
        return StepResult(d)

    def release(self, request: Request) -> None:
        pass
