"""Instance = scheduler + KV allocator + executor, stepped by whoever owns the clock.

The simulator calls ``step`` with virtual time and advances it by the result's
predicted duration; the engine's driver calls it with wall time and the measured one.
"""

from __future__ import annotations

from typing import Any, Protocol

from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request
from fairbatch.scheduler.base import Load, Scheduler


class Executor(Protocol):
    """Runs one StepPlan: the simulator's predicts its duration, the engine's computes it."""

    def execute(self, plan: StepPlan) -> StepResult: ...

    def release(self, request: Request) -> None:
        """The request left the instance (finished, aborted or preempted): drop its state."""


class OverlappingExecutor(Executor, Protocol):
    """An executor that can start a step before the last one's tokens are known
    (``step_ahead.py``). ``prepare`` does the step's host work from the requests' state
    at planning time (token ids not yet known are left as placeholders); ``launch``
    fills them in (the last step was settled by then) and starts the step without
    waiting for it; ``collect`` waits and returns its result. ``execute(plan)`` is
    ``collect(launch(prepare(plan)))``."""

    def prepare(self, plan: StepPlan) -> Any: ...

    def launch(self, prepared: Any) -> Any: ...

    def collect(self, launched: Any) -> StepResult: ...


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

    # --- one step ahead (step_ahead.py) -----------------------------------------------------
    def plan_step(self, now: float) -> tuple[StepPlan, Any]:
        """Schedule the step that starts at ``now`` and do its host work
        (``OverlappingExecutor.prepare``); nothing runs yet. None prepared when empty."""
        plan = self.scheduler.schedule(now)
        for req in plan.preempted:
            self.executor.release(req)
        for req in plan.rejected:
            self.executor.release(req)
        return plan, (self.executor.prepare(plan) if plan.chunks else None)   # type: ignore[attr-defined]

    def launch_step(self, plan: StepPlan, prepared: Any, predicted_end: float) -> tuple[Any, list[Request]]:
        """Start the planned step and advance its requests as if it ended at
        ``predicted_end``; returns the launched step and the requests it finishes by
        length (blocks freed: the next step, launched after it, is the next to use them)."""
        launched = self.executor.launch(prepared)   # type: ignore[attr-defined]
        finished = self.scheduler.advance_in_flight(plan, predicted_end)
        for req in finished:
            self.executor.release(req)
        return launched, finished

    def collect_step(self, launched: Any) -> StepResult:
        """Wait for a launched step and return what it produced."""
        return self.executor.collect(launched)   # type: ignore[attr-defined]

    def settle_step(self, plan: StepPlan, result: StepResult, end: float) -> list[Request]:
        """A launched step's tokens came back at ``end``: record them; returns the requests
        that stopped (blocks freed)."""
        finished = self.scheduler.settle(plan, result, end)
        for req in finished:
            self.executor.release(req)
        return finished

    def step(self, now: float) -> tuple[StepPlan, StepResult, list[Request]]:
        """One whole step starting at ``now`` (for callers that own nothing else)."""
        plan, result = self.begin_step(now)
        return plan, result, self.end_step(plan, result, now + result.duration)
