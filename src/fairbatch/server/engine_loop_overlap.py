"""``OverlappedEngineLoop``: the engine loop one step ahead (``fairbatch serve
--async-scheduling``, vLLM's name for the same idea; ``fairbatch.step_ahead`` has the
mechanics). Step N+1 is scheduled and built while step N runs; step N's tokens are posted
to the front end, and new commands taken in, while step N+1 runs."""

from __future__ import annotations

import time

from fairbatch.server.engine_loop import EngineLoop, Post, Receive, clock
from fairbatch.step_ahead import StepAhead


class OverlappedEngineLoop(EngineLoop):
    def __init__(self, instance, post: Post, **kw) -> None:   # noqa: ANN001 - an Instance
        self.ahead = StepAhead(instance, clock)            # refuses an executor that cannot
        super().__init__(instance, post, **kw)

    def run(self, receive: Receive, stopping) -> None:   # noqa: ANN001 - as EngineLoop.run
        inst, ahead = self.instance, self.ahead
        last_snapshot = 0.0
        self.publish_latency_model()
        while not stopping():
            cmds = receive(0.0 if ahead.in_flight or inst.has_work() else self.idle_wait)
            now = clock()
            if cmds:
                self.apply(cmds, now)
            if not ahead.in_flight and not inst.has_work():
                self.post_late_counts()
                if now - last_snapshot > self.snapshot_every:
                    self.publish_snapshot(now)
                    last_snapshot = now
                continue
            try:
                self.cycle(now)
            except Exception as e:   # noqa: BLE001 - an engine bug must not take the server down
                ahead.abandon()
                self.step_failed(e)
            t = clock()
            if t - last_snapshot > self.snapshot_every or not (ahead.in_flight or inst.has_work()):
                self.publish_snapshot(t)
                last_snapshot = t
        ahead.abandon()
        self.drop_all("server shutting down", notify=False)
        self.publish_snapshot(clock())

    def cycle(self, now: float) -> None:
        """One ``StepAhead`` cycle, then the step that came back: its cost, its tokens."""
        plan, settled = self.ahead.cycle(now)
        deltas = []
        if plan is not None:
            deltas = self.rejected_deltas(plan, now)
            self.mark_scheduled(plan, now)
        if settled is not None:
            self.count_step(settled.plan, settled.result)
            # the step's cost: launch to the next launch (or, going idle, to its end)
            nxt = self.ahead.launched_at
            self.account(settled.plan, (nxt if nxt is not None else settled.end) - settled.start)
            fin = {r.request_id for r in settled.finished}
            deltas += self.token_deltas(settled.plan, settled.result, fin, settled.end, settled=True)
        if deltas:
            self.post_deltas(deltas)
        elif settled is None and not self.ahead.in_flight:
            time.sleep(0.0005)   # nothing schedulable right now (should be rare): do not spin


def make_engine_loop(instance, post: Post, *, async_scheduling: bool = False, **kw) -> EngineLoop:   # noqa: ANN001
    """The loop ``fairbatch serve`` runs: one step ahead with ``async_scheduling``."""
    return (OverlappedEngineLoop if async_scheduling else EngineLoop)(instance, post, **kw)


__all__ = ["OverlappedEngineLoop", "make_engine_loop"]
