"""``AsyncEngine``: the engine's ``Instance`` stepped by a dedicated thread, with tokens
streamed to asyncio.

The engine thread owns the scheduler: it alone calls ``Instance.add / abort / step /
load``. The event loop talks to it through an inbox (a deque under a lock plus a wake-up
event) and receives every step's new tokens in ONE ``loop.call_soon_threadsafe`` call,
which fans them out to per-request-group asyncio queues. An abort (client gone, stop
string hit) is applied at the next step boundary, and ``Scheduler.abort`` frees the
request's KV blocks right there.

Time is ``time.perf_counter()`` everywhere: a request's ``arrival`` is stamped by the
HTTP handler when the request came in, and the scheduler's token times are the measured
ends of steps on the same clock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fairbatch.request import Request
from fairbatch.scheduler.base import Load

log = logging.getLogger("fairbatch.server")

clock = time.perf_counter


class QueueFull(Exception):
    """The server holds as many requests as it accepts; the client should retry later."""


class EngineDead(Exception):
    """The engine thread is not running (stopped, or died)."""


@dataclass(slots=True)
class Delta:
    """What one step produced for one request."""

    token_ids: list[int]
    finish_reason: str | None = None      # "stop" | "length" when the request finished
    error: str | None = None              # the engine failed this request
    time: float = 0.0                     # end of the step that produced the tokens
    start: int = 0                        # index of the first of token_ids in the output

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestGroup:
    """The engine requests behind one HTTP request (one per choice), sharing one queue
    of ``(choice index, Delta)`` items on the event loop."""

    def __init__(self, engine: "AsyncEngine", requests: Sequence[Request]) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.live: set[str] = {r.request_id for r in requests}

    @property
    def finished(self) -> bool:
        return not self.live

    def abort(self, index: int | None = None) -> None:
        """Abort one choice (``index``) or every unfinished one; idempotent."""
        reqs = self.requests if index is None else [self.requests[index]]
        ids = [r.request_id for r in reqs if r.request_id in self.live]
        if ids:
            self.engine.abort(ids)


@dataclass(slots=True)
class _Track:
    req: Request
    sent: int = 0          # output tokens already handed to the loop


@dataclass(slots=True)
class EngineSnapshot:
    """Cheap state for /metrics, refreshed by the engine thread."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    free_blocks: int = 0
    num_blocks: int = 0
    preemptions: int = 0
    steps: int = 0
    admission_budget: float = 0.0
    queued_prefill_tokens: int = 0
    time: float = 0.0


class AsyncEngine:
    """Thread-stepped engine. ``start()`` inside a running event loop (the app's lifespan)."""

    def __init__(self, model: Any, *, max_pending: int = 4096, metrics: Any = None,
                 idle_wait: float = 0.5) -> None:
        self.model = model
        self.instance = model.instance
        self.max_pending = max_pending
        self.metrics = metrics                   # ServerMetrics or None
        self._idle_wait = idle_wait
        self._inbox: deque[tuple[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[str, tuple[RequestGroup, int]] = {}   # loop thread only
        self.num_active = 0                                        # loop thread only
        self.snapshot = EngineSnapshot(num_blocks=model.allocator.num_blocks,
                                       free_blocks=model.allocator.num_free)
        self.error: str | None = None            # why the thread died, if it did
        self.step_errors = 0
        self._tracked: dict[str, _Track] = {}    # engine thread only

    # --- lifecycle (event loop) --------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fairbatch-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for rid, (group, idx) in list(self._groups.items()):
            group.queue.put_nowait((idx, Delta([], error="server shutting down")))
            group.live.discard(rid)
        self._groups.clear()
        self.num_active = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # --- requests (event loop) ---------------------------------------------------------------
    def add(self, requests: Sequence[Request]) -> RequestGroup:
        """Submit the requests of one HTTP request, all or none. Raises QueueFull / EngineDead."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is not running")
        if self.num_active + len(requests) > self.max_pending:
            raise QueueFull(f"the server holds {self.num_active} requests (limit {self.max_pending})")
        group = RequestGroup(self, requests)
        for i, r in enumerate(requests):
            self._groups[r.request_id] = (group, i)
        self.num_active += len(requests)
        if self.metrics is not None:
            for r in requests:
                self.metrics.on_arrival(r)
        self._send("add", list(requests))
        return group

    def abort(self, request_ids: Sequence[str]) -> None:
        """Forget the requests now; the engine frees their KV blocks at its next step boundary."""
        ids = []
        for rid in request_ids:
            entry = self._groups.pop(rid, None)
            if entry is not None:
                group, idx = entry
                group.live.discard(rid)
                self.num_active -= 1
                ids.append(rid)
                if self.metrics is not None:
                    self.metrics.on_abort(group.requests[idx])
        if ids:
            self._send("abort", ids)

    async def load(self, timeout: float = 5.0) -> Load:
        """A fresh ``Scheduler.load`` computed by the engine thread between steps."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is not running")
        fut: asyncio.Future[Load] = asyncio.get_running_loop().create_future()
        self._send("load", fut)
        return await asyncio.wait_for(fut, timeout)

    def _send(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._inbox.append((kind, payload))
        self._wake.set()

    def _dispatch(self, deltas: list[tuple[str, Delta]]) -> None:
        """On the loop: hand each request's delta to its group; observe metrics here, off
        the engine thread's critical path (a Request's past token times and, once it is
        finished, its final state are no longer written by the engine thread)."""
        groups = self._groups
        metrics = self.metrics
        for rid, delta in deltas:
            entry = groups.get(rid)
            if entry is None:
                continue            # aborted meanwhile
            group, idx = entry
            group.queue.put_nowait((idx, delta))
            if metrics is not None and delta.error is None:
                req = group.requests[idx]
                n = len(delta.token_ids)
                if n:
                    metrics.on_tokens(req, delta.start, delta.start + n)
                if delta.finish_reason is not None:
                    metrics.on_finish(req)
            if delta.done:
                del groups[rid]
                group.live.discard(rid)
                self.num_active -= 1

    def _resolve(self, fut: asyncio.Future, value: Any, error: BaseException | None = None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            init = getattr(self.model, "thread_init", None)
            if init is not None:
                init()          # e.g. make the model's CUDA device current in this thread
            self._loop_body()
        except BaseException as e:   # noqa: BLE001 - record why, fail everything, never hang clients
            self.error = f"engine thread died: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.error, traceback.format_exc())
            self._stopping = True
            self._fail_all(self.error)

    def _loop_body(self) -> None:
        inst = self.instance
        tracked = self._tracked
        loop = self._loop
        assert loop is not None
        last_snapshot = 0.0
        while not self._stopping:
            with self._lock:
                cmds = list(self._inbox)
                self._inbox.clear()
                self._wake.clear()
            now = clock()
            early: list[tuple[str, Delta]] = []
            for kind, payload in cmds:
                if kind == "add":
                    for req in payload:
                        try:
                            inst.add(req, now)
                        except ValueError as e:
                            early.append((req.request_id, Delta([], error=str(e), time=now)))
                            continue
                        tracked[req.request_id] = _Track(req)
                elif kind == "abort":
                    for rid in payload:
                        if tracked.pop(rid, None) is not None:
                            inst.abort(rid, now)
                elif kind == "load":
                    try:
                        load = inst.load(now)
                        loop.call_soon_threadsafe(self._resolve, payload, load)
                    except Exception as e:   # noqa: BLE001
                        loop.call_soon_threadsafe(self._resolve, payload, None, RuntimeError(str(e)))
            if early:
                loop.call_soon_threadsafe(self._dispatch, early)

            if not inst.has_work():
                self._refresh_snapshot(now)
                last_snapshot = now
                self._wake.wait(self._idle_wait)
                continue

            try:
                plan, result, finished = inst.step(now)
            except Exception as e:   # noqa: BLE001 - an engine bug must not take the server down
                self.step_errors += 1
                msg = f"engine step failed: {type(e).__name__}: {e}"
                log.error("%s\n%s", msg, traceback.format_exc())
                self._fail_tracked(msg)
                continue
            if plan.is_empty:
                time.sleep(0.0005)   # nothing schedulable right now (should be rare): do not spin
            else:
                deltas: list[tuple[str, Delta]] = []
                end = now + result.duration
                fin = {r.request_id for r in finished}
                for req, _ in plan.chunks:
                    t = tracked.get(req.request_id)
                    if t is None:
                        continue
                    gen = req.generated
                    if gen > t.sent or req.request_id in fin:
                        start = t.sent
                        toks = req.output_token_ids[start:gen]
                        t.sent = gen
                        reason = None
                        if req.request_id in fin:
                            reason = req.finish_reason or "length"
                            del tracked[req.request_id]
                        deltas.append((req.request_id, Delta(toks, reason, time=end, start=start)))
                if deltas:
                    loop.call_soon_threadsafe(self._dispatch, deltas)
            t_now = clock()
            if t_now - last_snapshot > 0.02:
                self._refresh_snapshot(t_now)
                last_snapshot = t_now
        # stopping: drop everything still in the instance (frees its blocks)
        now = clock()
        for rid in list(tracked):
            try:
                inst.abort(rid, now)
            except Exception:   # noqa: BLE001
                pass
        tracked.clear()
        self._refresh_snapshot(now)

    def _refresh_snapshot(self, now: float) -> None:
        sched = self.instance.scheduler
        try:
            load = sched.load(now)
        except Exception:   # noqa: BLE001 - a policy's estimate failing must not stop serving
            a = sched.allocator
            load = Load(len(sched.running), len(sched.waiting), a.usage, a.num_free, a.num_blocks, 0, 0.0, now)
        self.snapshot = EngineSnapshot(
            running=load.running, waiting=load.waiting, kv_usage=load.kv_usage, free_blocks=load.free_blocks,
            num_blocks=load.num_blocks, preemptions=sched.stats.preemptions, steps=sched.stats.steps,
            admission_budget=load.admission_budget, queued_prefill_tokens=load.queued_prefill_tokens, time=now)

    def _fail_tracked(self, message: str) -> None:
        """A step raised: abort every request in the instance (frees their blocks) and tell
        their clients; the thread then goes on serving new requests."""
        tracked = self._tracked
        now = clock()
        deltas = []
        for rid in list(tracked):
            try:
                self.instance.abort(rid, now)
            except Exception:   # noqa: BLE001
                pass
            deltas.append((rid, Delta([], error=message, time=now)))
        tracked.clear()
        sched = self.instance.scheduler
        # Anything the scheduler still holds that we do not track (should be nothing).
        for req in list(sched.running) + list(sched.waiting):
            try:
                self.instance.abort(req.request_id, now)
            except Exception:   # noqa: BLE001
                pass
        if deltas and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, deltas)

    def _fail_all(self, message: str) -> None:
        if self._tracked:
            self._fail_tracked(message)
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def fail_remaining() -> None:
            for rid, (group, idx) in list(self._groups.items()):
                group.queue.put_nowait((idx, Delta([], error=message)))
                group.live.discard(rid)
            self._groups.clear()
            self.num_active = 0
        try:
            loop.call_soon_threadsafe(fail_remaining)
        except RuntimeError:
            pass


__all__ = ["AsyncEngine", "Delta", "EngineDead", "EngineSnapshot", "QueueFull", "RequestGroup", "clock"]
