"""``StepAhead``: drive an ``Instance`` one step ahead (vLLM's async scheduling).

A host that steps an instance one step at a time leaves the device idle while it
schedules, builds the next step's inputs and hands out the last step's tokens. Here a
cycle is

    plan step N+1 (schedule, build its host inputs)   <- step N still on the device
    collect step N, settle its tokens                  (wait for it)
    launch step N+1                                    (its in-flight input ids filled in)
    the host's own work with step N's tokens           <- step N+1 on the device

so the device idles only between collecting one step and launching the next. Planning
ahead means committing to step N+1 before step N's tokens are known: the scheduler counts
them when N is launched, at N's predicted end (``Scheduler.advance_in_flight``), and gets
their ids and real time when N is collected (``Scheduler.settle``). A request that
samples a stop token in step N may already sit in step N+1: that step computes one token
for it that nobody sees (vLLM does the same). Blocks a request frees while a step is in
flight are reused only by steps launched after it, on the same device queue.

The instance's executor must be an ``OverlappingExecutor`` (the engine's and the
simulated one are). Nothing here reads a clock but the ``clock`` it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fairbatch.instance import Instance
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request, RequestState


def require_overlap(instance: Instance) -> None:
    """ValueError unless the instance's executor can launch a step without waiting for it."""
    ex = instance.executor
    if not all(hasattr(ex, m) for m in ("prepare", "launch", "collect")):
        raise ValueError(f"async scheduling needs an executor that can launch a step without waiting for it; "
                         f"{type(ex).__name__} cannot")


@dataclass(slots=True)
class Settled:
    """A step that came back: its tokens are recorded on its requests."""

    plan: StepPlan
    result: StepResult
    finished: list[Request]      # by length (known at launch) and by a stop token
    start: float                 # launched
    end: float                   # collected


@dataclass(slots=True)
class _InFlight:
    plan: StepPlan
    launched: Any
    start: float
    predicted_end: float
    finished: list[Request]      # by length, when launched


class StepAhead:
    def __init__(self, instance: Instance, clock: Callable[[], float]) -> None:
        require_overlap(instance)
        self.instance = instance
        self.clock = clock
        self._flight: _InFlight | None = None

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    @property
    def launched_at(self) -> float | None:
        """When the step now in flight was launched."""
        return self._flight.start if self._flight is not None else None

    def cycle(self, now: float) -> tuple[StepPlan | None, Settled | None]:
        """Plan the next step (if there is work), collect and settle the one in flight,
        launch the planned one. Returns the new plan (None without work; it may have no
        chunks, only refusals) and the step that came back (None if none was in flight).
        If this raises, the step in flight is forgotten (its requests need failing)."""
        inst = self.instance
        flight, self._flight = self._flight, None
        plan = prepared = None
        if inst.has_work():
            # the planned step starts when the one in flight ends, as far as anyone knows now
            plan, prepared = inst.plan_step(max(now, flight.predicted_end) if flight is not None else now)
        settled = None
        if flight is not None:
            result = inst.collect_step(flight.launched)
            end = self.clock()
            stopped = inst.settle_step(flight.plan, result, end)
            by_length = [r for r in flight.finished if r.state is RequestState.FINISHED]   # not aborted since
            settled = Settled(flight.plan, result, by_length + stopped, flight.start, end)
        if plan is not None and plan.chunks:
            start = self.clock()
            predicted = plan.predicted_time
            if predicted is None:
                predicted = inst.scheduler.latency.predict(plan.features)
            launched, finished = inst.launch_step(plan, prepared, start + predicted)
            self._flight = _InFlight(plan, launched, start, start + predicted, finished)
        return plan, settled

    def abandon(self) -> None:
        """Forget the step in flight (after a failure; its requests are dropped)."""
        self._flight = None


__all__ = ["Settled", "StepAhead", "require_overlap"]
