"""The engine side of serving: ``EngineLoop`` owns the ``Instance``, applies the commands
the front end sends (add, abort, load), steps, and posts each step's new tokens.

It knows nothing of its transport. ``receive(timeout)`` hands it the commands that came in
(waiting up to ``timeout`` for the first one when it has nothing to do) and ``post(msg)``
carries its messages back; both kinds are the typed messages of ``engine_messages``. The
engine process (``engine_process``, what ``fairbatch serve`` runs) plugs in a pipe; the
in-process thread (``engine_thread``, for tests and embedding) plugs in a deque and
``call_soon_threadsafe``.

Time is ``time.perf_counter()``: CLOCK_MONOTONIC on Linux, one clock for every process of
the host, so the HTTP handler's arrival stamp and the engine's token times compare.
"""

from __future__ import annotations

import logging
import time
import traceback
from bisect import bisect_left
from collections.abc import Callable

from fairbatch.instance import Instance
from fairbatch.latency.online import OnlineLatencyModel
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.base import Load
from fairbatch.server.engine_messages import (
    REJECTED,
    AbortRequests,
    AddRequests,
    Command,
    Delta,
    DeliveryDelays,
    EngineMessage,
    EngineSnapshot,
    LateCounts,
    LatencyProfile,
    LoadQuery,
    LoadReply,
    SnapshotUpdate,
    StepDeltas,
)

log = logging.getLogger("fairbatch.server")

# vLLM's iteration_tokens_total buckets: tokens computed by one engine step
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

clock = time.perf_counter

Post = Callable[[EngineMessage], None]
Receive = Callable[[float], list[Command]]


class EngineLoop:
    def __init__(self, instance: Instance, post: Post, *, idle_wait: float = 0.5,
                 snapshot_every: float = 0.02) -> None:
        self.instance = instance
        self.post = post
        self.idle_wait = idle_wait
        self.snapshot_every = snapshot_every
        self.step_errors = 0
        self.step_seconds = 0.0
        self.step_predicted_seconds = 0.0
        self.busy_seconds = 0.0
        self.step_tokens = 0
        self.steps_run = 0
        self._sent: dict[str, int] = {}     # request id -> output tokens already posted
        # prompt logprobs of the requests that asked, gathered over their prefill chunks
        # until their first token goes out (then dropped: a recompute scores them again)
        self._prompt_lp: dict[str, list] = {}
        self._scheduled: dict[str, float] = {}      # first scheduled, until its first delta
        self._unscheduled: set[str] = set()         # added, never scheduled yet
        self.iteration_tokens = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        lat = instance.scheduler.latency
        self._online = lat if isinstance(lat, OnlineLatencyModel) else None
        # the policy's overrun correction compares the same cycles the refit is fitted to
        # (on a GPU the executor's step was ~6 % shorter: the correction never engaged)
        instance.scheduler.host_reports_steps = True
        self.latency_refits = 0
        self._published_late = (0, 0)       # (rejected, relegated) as last posted

    def _late_counts(self) -> tuple[int, int]:
        st = self.instance.scheduler.stats
        return st.rejected, st.relegated

    def post_late_counts(self) -> None:
        """Post the scheduler's late-request counts if they changed since last posted."""
        counts = self._late_counts()
        if counts != self._published_late:
            self._published_late = counts
            self.post(LateCounts(*counts))

    def post_deltas(self, deltas: list[tuple[str, "Delta"]]) -> None:
        self.post_late_counts()
        self.post(StepDeltas(tuple(deltas)))

    def run(self, receive: Receive, stopping: Callable[[], bool]) -> None:
        """Serve until ``stopping()``; then drop whatever is left (frees its blocks)."""
        inst = self.instance
        last_snapshot = 0.0
        self.publish_latency_model()
        # The last step, until the next one starts: what a step costs the requests waiting
        # on it runs from its start to the next step's start (scheduling, execution,
        # hand-off, taking in new commands), and deadlines are kept on that clock.
        pending: tuple[StepPlan, float] | None = None
        while not stopping():
            cmds = receive(0.0 if inst.has_work() else self.idle_wait)
            now = clock()
            if pending is not None:
                self.account(pending[0], now - pending[1])
                pending = None
            if cmds:
                self.apply(cmds, now)
            if not inst.has_work():
                self.post_late_counts()
                if now - last_snapshot > self.snapshot_every:
                    self.publish_snapshot(now)
                    last_snapshot = now
                continue
            plan = self.step(now)
            t = clock()
            if plan is not None:
                if inst.has_work():
                    pending = (plan, now)
                else:
                    self.account(plan, t - now)     # going idle: the wait is no cost of this step
            # also at once when the engine just went idle (or a step failed): whoever reads
            # /metrics after a burst sees its final state, not one up to idle_wait old
            if t - last_snapshot > self.snapshot_every or not inst.has_work():
                self.publish_snapshot(t)
                last_snapshot = t
        self.drop_all("server shutting down", notify=False)
        self.publish_snapshot(clock())

    def account(self, plan: StepPlan, seconds: float) -> None:
        """A step's whole cost on the wall clock, once known: into the busy counter and, with
        an online step-time model, into its refit window."""
        self.busy_seconds += seconds
        if plan.predicted_time is not None:
            self.instance.scheduler.observe_step(plan.predicted_time, seconds)
        if self._online is not None and self._online.observe(plan.features, seconds):
            self.instance.scheduler.latency_model_changed()
            self.latency_refits += 1
            self.publish_latency_model()

    def apply(self, cmds: list[Command], now: float) -> None:
        inst = self.instance
        early: list[tuple[str, Delta]] = []
        for cmd in cmds:
            if isinstance(cmd, AddRequests):
                for req in cmd.requests:
                    try:
                        inst.add(req, now)
                    except ValueError as e:
                        early.append((req.request_id, Delta([], error=str(e), time=now)))
                        continue
                    if req.state is RequestState.REJECTED:    # late=reject: hopeless on arrival
                        early.append((req.request_id, Delta([], REJECTED, time=now)))
                        continue
                    self._sent[req.request_id] = 0
                    self._unscheduled.add(req.request_id)
                    if getattr(req.sampling, "prompt_logprobs", None) is not None:
                        self._prompt_lp[req.request_id] = [None]    # position 0: nothing scores it
            elif isinstance(cmd, AbortRequests):
                for rid in cmd.request_ids:
                    self._prompt_lp.pop(rid, None)
                    self._scheduled.pop(rid, None)
                    self._unscheduled.discard(rid)
                    if self._sent.pop(rid, None) is not None:
                        inst.abort(rid, now)
            elif isinstance(cmd, DeliveryDelays):
                for delay in cmd.delays:
                    inst.scheduler.observe_delivery(delay)
            elif isinstance(cmd, LoadQuery):
                try:
                    self.post(LoadReply(cmd.token, inst.load(now)))
                except Exception as e:   # noqa: BLE001 - a policy's estimate failing must not stop serving
                    self.post(LoadReply(cmd.token, None, f"{type(e).__name__}: {e}"))
            else:
                log.error("engine loop: unknown command %r", cmd)
        if early:
            self.post_deltas(early)

    def step(self, now: float) -> StepPlan | None:
        """One step; returns its plan (None when it failed or was empty)."""
        inst = self.instance
        try:
            plan, result, finished = inst.step(now)
        except Exception as e:   # noqa: BLE001 - an engine bug must not take the server down
            self.step_failed(e)
            return None
        deltas = self.rejected_deltas(plan, now)
        if plan.is_empty:
            if deltas:
                self.post_deltas(deltas)
            else:
                time.sleep(0.0005)   # nothing schedulable right now (should be rare): do not spin
            return None
        self.mark_scheduled(plan, now)
        self.count_step(plan, result)
        deltas += self.token_deltas(plan, result, {r.request_id for r in finished}, now + result.duration)
        if deltas:
            self.post_deltas(deltas)
        return plan

    def step_failed(self, e: Exception) -> None:
        """A step raised: log it, fail every request in the instance, go on serving."""
        self.step_errors += 1
        msg = f"engine step failed: {type(e).__name__}: {e}"
        log.error("%s\n%s", msg, traceback.format_exc())
        self.drop_all(msg, notify=True)

    def rejected_deltas(self, plan: StepPlan, now: float) -> list[tuple[str, Delta]]:
        """Requests the plan refused while queued or part-way through their prefill
        (late=reject); the instance already released their KV and executor state."""
        sent = self._sent
        deltas: list[tuple[str, Delta]] = [(r.request_id, Delta([], REJECTED, time=now)) for r in plan.rejected
                                           if sent.pop(r.request_id, None) is not None]
        for r in plan.rejected:
            self._prompt_lp.pop(r.request_id, None)
            self._unscheduled.discard(r.request_id)
            self._scheduled.pop(r.request_id, None)
        return deltas

    def mark_scheduled(self, plan: StepPlan, now: float) -> None:
        """When each request of the plan was first scheduled (its queueing time)."""
        if self._unscheduled:
            for req, _ in plan.chunks:
                if req.request_id in self._unscheduled:
                    self._unscheduled.discard(req.request_id)
                    self._scheduled[req.request_id] = now

    def count_step(self, plan: StepPlan, result: StepResult) -> None:
        inst = self.instance
        self.steps_run += 1
        self.step_seconds += result.duration
        self.step_predicted_seconds += inst.scheduler.latency.predict(plan.features)
        self.step_tokens += plan.features.new_tokens
        self.iteration_tokens[bisect_left(ITERATION_TOKENS_BUCKETS, plan.features.new_tokens)] += 1

    def token_deltas(self, plan: StepPlan, result: StepResult, fin: set[str], end: float, *,
                     settled: bool = False) -> list[tuple[str, Delta]]:
        """Each request's new tokens from the step that ended at ``end`` (and its finish,
        for those in ``fin``). ``settled``: the next step is already in flight, so only the
        tokens whose ids are known (``output_token_ids``) are this step's."""
        sent = self._sent
        deltas: list[tuple[str, Delta]] = []
        if result.prompt_logprobs:
            self._gather_prompt_logprobs(result.prompt_logprobs)
        sample_lp = result.logprobs or {}
        for req, _ in plan.chunks:
            rid = req.request_id
            start = sent.get(rid)
            if start is None:
                continue
            gen = len(req.output_token_ids) if settled else req.generated
            if gen > start or rid in fin:
                reason = None
                if rid in fin:
                    reason = req.finish_reason or "length"
                    del sent[rid]
                else:
                    sent[rid] = gen
                delta = Delta(req.output_token_ids[start:gen], reason, time=end, start=start)
                if rid in sample_lp:
                    delta.logprobs = [sample_lp[rid]]
                if rid in self._prompt_lp:
                    delta.prompt_logprobs = self._prompt_lp.pop(rid)
                if rid in self._scheduled:
                    delta.scheduled = self._scheduled.pop(rid)
                    delta.cached_tokens = req.num_cached_tokens    # set at its first admission
                if reason is not None:
                    delta.num_preemptions = req.num_preemptions
                deltas.append((rid, delta))
        return deltas

    def _gather_prompt_logprobs(self, scored: dict[str, tuple[int, list]]) -> None:
        """Append each request's newly scored prompt positions, once each: a request
        preempted and recomputed scores its prompt again."""
        for rid, (lo, entries) in scored.items():
            acc = self._prompt_lp.get(rid)
            if acc is None:
                continue
            skip = len(acc) - lo
            if skip >= 0:
                acc.extend(entries[skip:])

    def drop_all(self, message: str, *, notify: bool) -> None:
        """Abort every request in the instance (frees their blocks); tell their clients
        when ``notify``. After a failed step the loop goes on serving new requests."""
        inst = self.instance
        now = clock()
        deltas = [(rid, Delta([], error=message, time=now)) for rid in self._sent]
        ids = dict.fromkeys([*self._sent, *inst.scheduler.request_ids()])
        self._sent.clear()
        self._prompt_lp.clear()
        self._scheduled.clear()
        self._unscheduled.clear()
        for rid in ids:
            try:
                inst.abort(rid, now)
            except Exception:   # noqa: BLE001
                pass
        if notify and deltas:
            self.post_deltas(deltas)

    def publish_latency_model(self) -> None:
        """The scheduler's step-time model as a profile (``fairbatch simulate --profile``)."""
        lat = self.instance.scheduler.latency
        current = lat.current if isinstance(lat, OnlineLatencyModel) else lat
        try:
            self.post(LatencyProfile(current.to_dict()))
        except Exception:   # noqa: BLE001 - a model without a JSON form: nothing to publish
            log.debug("latency model %r has no profile form", current)

    def publish_snapshot(self, now: float) -> None:
        sched = self.instance.scheduler
        self._published_late = self._late_counts()
        try:
            load = sched.load(now)
        except Exception:   # noqa: BLE001
            a = sched.allocator
            load = Load(sched.num_running, sched.num_waiting, a.usage, a.num_free, a.num_blocks, 0, 0.0, now)
        self.post(SnapshotUpdate(EngineSnapshot(
            running=load.running, waiting=load.waiting, kv_usage=load.kv_usage, free_blocks=load.free_blocks,
            num_blocks=load.num_blocks, preemptions=sched.stats.preemptions, steps=sched.stats.steps,
            admission_budget=load.admission_budget, queued_prefill_tokens=load.queued_prefill_tokens,
            step_errors=self.step_errors, step_seconds=self.step_seconds,
            step_predicted_seconds=self.step_predicted_seconds, busy_seconds=self.busy_seconds,
            step_tokens=self.step_tokens, steps_run=self.steps_run, latency_refits=self.latency_refits,
            latency_refit_attempts=self._online.refit_attempts if self._online is not None else 0,
            rejected=sched.stats.rejected, relegated=sched.stats.relegated,
            iteration_tokens=tuple(self.iteration_tokens), prefix_cache_queries=sched.allocator.prefix_queries,
            prefix_cache_hits=sched.allocator.prefix_hits, time=now)))


def mirror(req: Request, delta: Delta) -> None:
    """Replay a delta onto the front end's copy of a request that runs in another process,
    so metrics read the same token times and finish state as the engine's copy holds."""
    if delta.cached_tokens is not None:
        req.num_cached_tokens = delta.cached_tokens
    for tok in delta.token_ids:
        req.record_token(delta.time, tok)
    if delta.finish_reason is not None:
        req.finish_reason = delta.finish_reason
        req.finish_time = delta.time
        req.num_preemptions = delta.num_preemptions
        if delta.rejected:
            req.state = RequestState.REJECTED


__all__ = ["REJECTED", "Delta", "EngineLoop", "EngineSnapshot", "clock", "mirror"]
