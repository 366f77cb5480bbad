"""``OverlappedEngineLoop``: the engine loop with the next step planned while the last one
runs (``fairbatch serve --async-scheduling``, vLLM's name for the same idea).

In the plain loop the device waits while the host takes in commands, schedules, builds
the next step's inputs, and hands the last step's tokens to the front end. Here a cycle
is

    plan step N+1 (schedule, build its host inputs)   <- step N still on the device
    collect step N, settle its tokens                  (wait for it)
    launch step N+1                                    (its in-flight input ids filled in)
    post step N's tokens, take in commands             <- step N+1 on the device

so the device idles only between collecting one step and launching the next. Planning
ahead means committing to step N+1 before step N's tokens are known: the scheduler counts
them when N is launched, at N's predicted end (``Scheduler.advance_in_flight``), and gets
their ids and real time when N is collected (``Scheduler.settle``). A request that
samples a stop token in step N may already sit in step N+1: that step computes one token
for it that nobody sees (vLLM does the same). Blocks a request frees while a step is in
flight are reused only by steps launched after it, on the same device queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fairbatch.plan import StepPlan
from fairbatch.request import Request
from fairbatch.server.engine_loop import EngineLoop, Receive, clock


def require_overlap(instance) -> None:   # noqa: ANN001 - an Instance
    """ValueError unless the instance's executor can launch a step without waiting for it."""
    ex = instance.executor
    if not all(hasattr(ex, m) for m in ("prepare", "launch", "collect")):
        raise ValueError(f"--async-scheduling needs an executor that can launch a step without waiting for it; "
                         f"{type(ex).__name__} cannot")


@dataclass(slots=True)
class _InFlight:
    plan: StepPlan
    launched: Any
    start: float                 # when it was launched
    predicted_end: float
    finished: list[Request]      # finished by length when launched


class OverlappedEngineLoop(EngineLoop):
    """``EngineLoop`` one step ahead; the instance's executor must be an
    ``OverlappingExecutor`` (the engine's and the simulated one are)."""

    def __init__(self, instance, post, **kw) -> None:   # noqa: ANN001 - as EngineLoop
        require_overlap(instance)
        super().__init__(instance, post, **kw)
        self._flight: _InFlight | None = None

    def run(self, receive: Receive, stopping) -> None:   # noqa: ANN001 - as EngineLoop.run
        inst = self.instance
        last_snapshot = 0.0
        self.publish_latency_model()
        while not stopping():
            busy = self._flight is not None or inst.has_work()
            cmds = receive(0.0 if busy else self.idle_wait)
            now = clock()
            if cmds:
                self.apply(cmds, now)
            if self._flight is None and not inst.has_work():
                self.post_late_counts()
                if now - last_snapshot > self.snapshot_every:
                    self.publish_snapshot(now)
                    last_snapshot = now
                continue
            try:
                self.cycle(now)
            except Exception as e:   # noqa: BLE001 - an engine bug must not take the server down
                self._flight = None
                self.step_failed(e)
            t = clock()
            if t - last_snapshot > self.snapshot_every or (self._flight is None and not inst.has_work()):
                self.publish_snapshot(t)
                last_snapshot = t
        self._flight = None
        self.drop_all("server shutting down", notify=False)
        self.publish_snapshot(clock())

    def cycle(self, now: float) -> None:
        """Plan the next step, collect the one in flight, launch the next, post the
        collected one's tokens."""
        inst = self.instance
        flight = self._flight
        plan, prepared, deltas = None, None, []
        if inst.has_work():
            # the planned step starts when the one in flight ends, as far as anyone knows now
            plan, prepared = inst.plan_step(max(now, flight.predicted_end) if flight is not None else now)
            deltas = self.rejected_deltas(plan, now)
            self.mark_scheduled(plan, now)
        result = stopped = None
        if flight is not None:
            result = inst.collect_step(flight.launched)
            end = clock()
            stopped = inst.settle_step(flight.plan, result, end)
        self._flight = None
        if plan is not None and plan.chunks:
            start = clock()
            predicted = plan.predicted_time
            if predicted is None:
                predicted = inst.scheduler.latency.predict(plan.features)
            launched, finished = inst.launch_step(plan, prepared, start + predicted)
            self._flight = _InFlight(plan, launched, start, start + predicted, finished)
        if flight is not None:
            assert result is not None and stopped is not None
            self.count_step(flight.plan, result)
            # the step's cost: launch to the next launch (or, going idle, to its end)
            self.account(flight.plan, (self._flight.start if self._flight is not None else end) - flight.start)
            fin = {r.request_id for r in flight.finished}
            fin.update(r.request_id for r in stopped)
            deltas += self.token_deltas(flight.plan, result, fin, end, settled=True)
        if deltas:
            self.post_deltas(deltas)
        elif flight is None and self._flight is None:
            time.sleep(0.0005)   # nothing schedulable right now (should be rare): do not spin


def make_engine_loop(instance, post, *, async_scheduling: bool = False, **kw) -> EngineLoop:   # noqa: ANN001
    """The loop ``fairbatch serve`` runs: one step ahead with ``async_scheduling``."""
    return (OverlappedEngineLoop if async_scheduling else EngineLoop)(instance, post, **kw)


__all__ = ["OverlappedEngineLoop", "make_engine_loop", "require_overlap"]
