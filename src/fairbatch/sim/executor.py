"""The simulator's executors: a step takes what the latency model predicts (or that, with
the deviations a real engine's steps show)."""

from __future__ import annotations

import math
import random

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


class NoisySimExecutor(SimExecutor):
    """Steps that deviate from the model the way a real engine's do: the model's time times
    ``exp(x)``, ``x`` an AR(1) process with standard deviation ``sigma`` and step-to-step
    correlation ``rho`` (stretches of slow and fast steps, not independent jitter), mean 1.
    For studying how a policy copes with a model that is right on average and wrong now."""

    __slots__ = ("sigma", "rho", "_x", "_rng")

    def __init__(self, model: LatencyModel, sigma: float, rho: float = 0.0, seed: int = 0) -> None:
        if sigma < 0 or not 0 <= rho < 1:
            raise ValueError(f"need sigma >= 0 and 0 <= rho < 1, got sigma={sigma} rho={rho}")
        super().__init__(model)
        self.sigma = sigma
        self.rho = rho
        self._x = 0.0
        self._rng = random.Random(seed)

    def execute(self, plan: StepPlan) -> StepResult:
        d = self.model.predict(plan.features)
        if self.sigma:
            self._x = self.rho * self._x + math.sqrt(1.0 - self.rho ** 2) * self._rng.gauss(0.0, self.sigma)
            d *= math.exp(self._x - 0.5 * self.sigma ** 2)
        self.busy_time += d
        self.steps += 1
        return StepResult(d)
