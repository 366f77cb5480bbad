"""Instance = scheduler + KV allocator + executor, stepped by whoever owns the clock.

The simulator calls ``step`` with virtual time and advances it by the result's
predicted duration; the engine's driver calls it with wall time and the measured one.
"""

from __future__ import annotations

from typing import Protocol

from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request
from fairbatch.scheduler.base import Load, Scheduler


class Executor(Protocol):
    """Runs one StepPlan: the simulator's predicts its duration, the engine's computes it."""

    def execute(self, plan: StepPlan) -> StepResult: ...

    def release(self, request: Request) -> None:
        """The request left the instance (finished, aborted or preempted): drop its state."""


class Instance:
    __slots__ = ("scheduler", "executor", "name")

    def __init__(self, scheduler: Scheduler, executor: Executor, name: str = "instance-0") -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.name = name

    def add(self, req: Request, now: float) -> None:
        self.scheduler.add(req, now)

    def abort(self, request_id: str, now: float) -> Request | None:
        req = self.scheduler.abort(request_id, now)
        if req is not None:
            self.executor.release(req)
        return req

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def load(self, now: float) -> Load:
        return self.scheduler.load(now)

    def begin_step(self, now: float) -> tuple[StepPlan, StepResult]:
        """Schedule and execute the step that starts at ``now``; it ends at
        ``now + result.duration``, when ``end_step`` must be called."""
        plan = self.scheduler.schedule(now)
        for req in plan.preempted:
            self.executor.release(req)
        for req in plan.rejected:
            self.executor.release(req)
        if not plan.chunks:
            return plan, StepResult(0.0)
        return plan, self.executor.execute(plan)

    def end_step(self, plan: StepPlan, result: StepResult, end: float) -> list[Request]:
        """Account the step at its end time; returns the finished requests (blocks freed)."""
        if not plan.chunks:
            return []
        finished = self.scheduler.on_step_end(plan, result, end)
        for req in finished:
            self.executor.release(req)
        return finished

    def step(self, now: float) -> tuple[StepPlan, StepResult, list[Request]]:
        """One whole step starting at ``now`` (for callers that own nothing else)."""
        plan, result = self.begin_step(now)
        return plan, result, self.end_step(plan, result, now + result.duration)
