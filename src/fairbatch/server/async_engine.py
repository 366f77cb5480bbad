"""``AsyncEngine``: the server's front end to the engine loop, on the event loop.

The engine loop (``engine_loop.EngineLoop``) runs elsewhere, behind a backend: its own
process (``engine_process.ProcessBackend``, what ``fairbatch serve`` uses, so the GPU
step never waits on the event loop for the GIL) or a thread of this process
(``engine_thread.ThreadBackend``). A backend has the coroutines ``start(loop, on_message)``
and ``stop()``, ``send(command)``, ``alive`` and ``error``; it delivers the engine's
messages to ``on_message`` on the event loop. Both directions are the typed messages of
``engine_messages``.

Here: every HTTP request's engine requests form a ``RequestGroup`` with one asyncio
queue; each step's deltas arrive in one message and fan out to those queues, first tokens
first, later ones once the new streams have written theirs (``_dispatch``). A request
the scheduler refused (``late=reject``) gets one last delta with finish reason "rejected"
(the app answers 429). An abort (client gone, stop string hit) is sent at once and
applied at the engine's next step boundary, where ``Scheduler.abort`` frees the
request's KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from fairbatch.request import Request
from fairbatch.scheduler.base import Load
from fairbatch.server.engine_loop import clock, mirror
from fairbatch.server.engine_messages import (
    AbortRequests,
    AddRequests,
    Delta,
    DeliveryDelays,
    EngineGone,
    EngineMessage,
    EngineRevived,
    EngineSnapshot,
    LateCounts,
    LatencyProfile,
    LoadQuery,
    LoadReply,
    SnapshotUpdate,
    StepDeltas,
)


# Later tokens of a step wait at most this long for its first tokens' streams to write
# (a stream whose client left never writes).
HOLD_LATER_TOKENS_S = 0.005


class QueueFull(Exception):
    """The server holds as many requests as it accepts; the client should retry later."""


class EngineDead(Exception):
    """The engine is not running (stopped, or died)."""


class RequestGroup:
    """The engine requests behind one HTTP request (one per choice), sharing one queue
    of ``(choice index, Delta)`` items on the event loop."""

    def __init__(self, engine: "AsyncEngine", requests: Sequence[Request]) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.live: set[str] = {r.request_id for r in requests}
        self.streaming = False     # its answer is an SSE stream (set before its first delta)

    @property
    def finished(self) -> bool:
        return not self.live

    def first_chunk_written(self, index: int) -> None:
        """The stream wrote choice ``index``'s first token to its connection."""
        self.engine.first_chunk_written(self.requests[index].request_id)

    def abort(self, index: int | None = None, *, finished: bool = False) -> None:
        """Abort one choice (``index``) or every unfinished one; idempotent. ``finished``:
        the choice is complete (a stop string matched), so metrics count it as finished
        with reason "stop", not as aborted."""
        reqs = self.requests if index is None else [self.requests[index]]
        ids = [r.request_id for r in reqs if r.request_id in self.live]
        if ids:
            self.engine.abort(ids, finished=finished)


class AsyncEngine:
    """``start()`` inside a running event loop (the app's lifespan). Default backend: a
    thread of this process running the model's in-process ``Instance``."""

    def __init__(self, model: Any, *, backend: Any = None, max_pending: int = 4096, metrics: Any = None) -> None:
        if backend is None:
            from fairbatch.server.engine_thread import ThreadBackend

            backend = ThreadBackend(model)
        self.model = model
        self.backend = backend
        self.max_pending = max_pending
        self.metrics = metrics                   # ServerMetrics or None
        self._groups: dict[str, tuple[RequestGroup, int]] = {}
        self._loads: dict[int, asyncio.Future[Load]] = {}
        self._tokens = itertools.count()
        self.num_active = 0
        self.snapshot = EngineSnapshot(num_blocks=model.num_blocks, free_blocks=model.num_blocks)
        self.latency_profile: dict[str, Any] | None = None   # the scheduler's step-time model
        self._error: str | None = None           # the engine died, and why
        self._started = False
        self._delays: list[float] = []           # first-token delivery delays not yet sent
        # a step's later tokens, held until its first tokens' streams have written them
        self._held: list[tuple[str, Delta]] = []
        self._awaited: set[str] = set()          # request ids whose first chunk is not written yet
        self._hold_timer: asyncio.TimerHandle | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.backend.start(asyncio.get_running_loop(), self._on_message)

    async def stop(self, timeout: float = 10.0) -> None:
        await self.backend.stop(timeout)
        self._fail_all("server shutting down")

    @property
    def alive(self) -> bool:
        return self._error is None and self.backend.alive

    @property
    def error(self) -> str | None:
        return self._error or self.backend.error

    @property
    def step_errors(self) -> int:
        return self.snapshot.step_errors

    # --- requests ------------------------------------------------------------------------------
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
        self.backend.send(AddRequests(tuple(requests)))
        return group

    def abort(self, request_ids: Sequence[str], *, finished: bool = False) -> None:
        """Forget the requests now; the engine frees their KV blocks at its next step boundary.
        ``finished``: they ended on a stop string (counted as finished, reason "stop")."""
        ids = []
        for rid in request_ids:
            entry = self._groups.pop(rid, None)
            if entry is not None:
                group, idx = entry
                group.live.discard(rid)
                self.num_active -= 1
                ids.append(rid)
                if self.metrics is not None:
                    if finished:
                        self.metrics.on_finish(group.requests[idx], reason="stop")
                    else:
                        self.metrics.on_abort(group.requests[idx])
        if ids and self.alive:
            self.backend.send(AbortRequests(tuple(ids)))

    def first_chunk_written(self, request_id: str) -> None:
        """A stream wrote its first token: once every first token of the step is out, its
        later tokens go to their streams."""
        if request_id in self._awaited:
            self._awaited.discard(request_id)
            if not self._awaited:
                self._release_held()

    def first_token_delivered(self, delta: Delta) -> None:
        """A first token (produced by the step that ended at ``delta.time``) is being handed
        to its client now: the delay goes to the scheduler with the next step's deltas
        (``ttft_margin_quantile``), one message per step rather than per token."""
        delay = clock() - delta.time
        self._delays.append(delay)
        if self.metrics is not None:
            self.metrics.on_first_token_delivered(delay)

    async def load(self, timeout: float = 5.0) -> Load:
        """A fresh ``Scheduler.load`` computed by the engine between steps."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is not running")
        token = next(self._tokens)
        fut: asyncio.Future[Load] = asyncio.get_running_loop().create_future()
        self._loads[token] = fut
        self.backend.send(LoadQuery(token))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._loads.pop(token, None)

    # --- the engine's messages (event loop) ----------------------------------------------------
    def _on_message(self, msg: EngineMessage) -> None:
        if isinstance(msg, StepDeltas):
            if self._delays and self.alive:     # the previous steps' first tokens are out by now
                self.backend.send(DeliveryDelays(tuple(self._delays)))
                self._delays.clear()
            self._dispatch(msg.deltas)
        elif isinstance(msg, SnapshotUpdate):
            self.snapshot = msg.snapshot
        elif isinstance(msg, LateCounts):        # fresher than the last snapshot's
            self.snapshot.rejected, self.snapshot.relegated = msg.rejected, msg.relegated
        elif isinstance(msg, LatencyProfile):
            self.latency_profile = msg.profile
        elif isinstance(msg, LoadReply):
            fut = self._loads.get(msg.token)
            if fut is not None and not fut.done():
                if msg.error is not None:
                    fut.set_exception(RuntimeError(msg.error))
                else:
                    fut.set_result(msg.load)
        elif isinstance(msg, EngineGone):
            self._error = msg.reason
            self._fail_all(self._error)
        elif isinstance(msg, EngineRevived):     # a new engine process (engine_restart) serves from now on
            self._error = None

    def _dispatch(self, deltas: tuple[tuple[str, Delta], ...]) -> None:
        """First tokens first. A step's tokens take the front end milliseconds to stream
        (hundreds of streams, each woken in turn), and a first token is what a TTFT
        deadline waits on, while a later one has a TPOT's slack. A new stream's first
        token also takes several turns of the event loop to reach its socket (the
        response starts), each behind every task then ready; so the step's later tokens
        are held until the new streams have written their first (at most
        ``HOLD_LATER_TOKENS_S`` from the first hold; a step arriving meanwhile has its first
        tokens go ahead of them too)."""
        first = [d for d in deltas if _is_first_token(d)]
        later = [d for d in deltas if not _is_first_token(d)] if first else deltas
        groups = self._groups
        self._awaited.update(rid for rid, _ in first if rid in groups and groups[rid][0].streaming)
        self._deliver(first)        # ahead of tokens still held from earlier steps: no request has both
        self._held.extend(later)    # behind them: per request, tokens stay in step order
        if not self._awaited:
            self._release_held()
        elif self._hold_timer is None:
            self._hold_timer = asyncio.get_running_loop().call_later(HOLD_LATER_TOKENS_S, self._release_held)

    def _release_held(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._awaited.clear()
        if self._held:
            held, self._held = self._held, []
            self._deliver(held)

    def _deliver(self, deltas: Sequence[tuple[str, Delta]]) -> None:
        """Hand each request's delta to its group and observe metrics, here, off the
        engine's critical path."""
        groups = self._groups
        metrics = self.metrics
        mirrors = self.backend.mirrors
        for rid, delta in deltas:
            entry = groups.get(rid)
            if entry is None:
                continue            # aborted meanwhile
            group, idx = entry
            req = group.requests[idx]
            if mirrors:
                mirror(req, delta)
            group.queue.put_nowait((idx, delta))
            if metrics is not None and delta.error is None:
                if delta.scheduled is not None:
                    metrics.on_scheduled(req, delta.scheduled)
                if delta.rejected:
                    metrics.on_late_reject(req)
                else:
                    n = len(delta.token_ids)
                    if n:
                        metrics.on_tokens(req, delta.start, delta.start + n)
                    if delta.finish_reason is not None:
                        metrics.on_finish(req)
            if delta.done:
                del groups[rid]
                group.live.discard(rid)
                self.num_active -= 1

    def _fail_all(self, message: str) -> None:
        self._release_held()
        for rid, (group, idx) in list(self._groups.items()):
            group.queue.put_nowait((idx, Delta([], error=message, time=clock())))
            group.live.discard(rid)
        self._groups.clear()
        self.num_active = 0
        for fut in self._loads.values():
            if not fut.done():
                fut.set_exception(EngineDead(message))


def _is_first_token(item: tuple[str, Delta]) -> bool:
    delta = item[1]
    return delta.start == 0 and bool(delta.token_ids)


__all__ = ["AsyncEngine", "Delta", "EngineDead", "EngineSnapshot", "QueueFull", "RequestGroup", "clock"]
