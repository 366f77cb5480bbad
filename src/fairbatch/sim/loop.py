"""The discrete-event loop: arrivals and step ends, in time order, for N instances.

Each instance runs one step at a time: the step is planned and executed at its start
(``Instance.begin_step``) and accounted at its end (``Instance.end_step``), so requests
arriving meanwhile queue exactly as they would on a real engine, and a router reading
an instance's load mid-step sees the state a real one would report.

Costs, for cluster-scale runs: the router's view of the loads is patched only where an
instance changed (``sim.loads.LoadView``); requests may come from an iterator in arrival
order and be handed to ``on_done`` as they leave, so that nothing of a finished request
need stay in memory (``keep_requests=False``).
"""

from __future__ import annotations

import heapq
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from fairbatch.routing import Router
from fairbatch.instance import Instance
from fairbatch.request import Request, RequestState
from fairbatch.sim.loads import LoadView

_INF = float("inf")

@dataclass
class SimOutcome:
    requests: list[Request]                 # every request, in arrival order (empty: keep_requests=False)
    end_time: float                         # virtual time the last step ended
    wall_time: float                        # seconds the simulation took
    cpu_time: float = 0.0                   # CPU seconds of this process (robust to a busy machine)
    steps: list[int] = field(default_factory=list)          # per instance
    busy_time: list[float] = field(default_factory=list)    # per instance, virtual seconds
    assigned: list[int] = field(default_factory=list)       # requests routed to each instance
    preemptions: int = 0
    rejected: int = 0                       # refused at admission (e.g. longer than the context)
    unfinished: int = 0                     # still pending when the simulation gave up
    num_requests: int = 0
    # the instance each request was routed to, in arrival order (-1: none)
    instance_of: array = field(default_factory=lambda: array("i"))


def simulate(
    requests: Iterable[Request],
    instances: Sequence[Instance],
    router: Router | None = None,
    *,
    load_interval: float = 0.0,
    progress: Callable[[int], None] | None = None,
    keep_requests: bool = True,
    on_done: Callable[[int, Request], None] | None = None,
    route: Callable[[int], int] | None = None,
) -> SimOutcome:
    """Run ``requests`` through ``instances``.

    With several instances a ``router`` picks one per arrival from their loads, which
    are at most ``load_interval`` seconds old; or ``route(i)`` gives the instance of the
    i-th arrival outright (a routing decided in advance, e.g. round robin). ``progress(n)``
    is called now and then with the number of requests that have arrived.

    ``keep_requests`` (default): ``requests`` in any order, sorted here by arrival, and all
    kept in the outcome. Otherwise they must come in arrival order (an iterator is fine)
    and are dropped as they leave; ``on_done(i, request)`` sees each one then (finished,
    refused, or aborted at the end), ``i`` its arrival index, to summarise it. The loop
    keeps that index in each request's ``user_data``.
    """
    if not instances:
        raise ValueError("need at least one instance")
    if len(instances) > 1 and router is None and route is None:
        raise ValueError("several instances need a router")
    t0 = time.perf_counter()
    c0 = time.process_time()
    kept: list[Request] = sorted(requests, key=lambda r: r.arrival) if keep_requests else []
    arrivals = iter(kept) if keep_requests else iter(requests)
    n_inst = len(instances)
    busy = [False] * n_inst
    assigned = [0] * n_inst
    instance_of = array("i")
    heap: list[tuple[float, int, int, object, object]] = []
    seq = 0
    rejected = 0
    end_time = 0.0
    loads = (LoadView(instances, load_interval, getattr(router, "reads", None))
             if router is not None and router.uses_load and route is None else None)
    mark = loads.mark if loads is not None else None
    inflight: dict[int, Request] = {}      # arrival index -> request, until it leaves

    def done(req: Request) -> None:
        i = req.user_data
        del inflight[i]
        if on_done is not None:
            on_done(i, req)

    def start(k: int, now: float) -> None:
        nonlocal seq
        inst = instances[k]
        if not inst.has_work():
            busy[k] = False
            return
        plan, result = inst.begin_step(now)
        if mark is not None:
            mark(k)
        for r in plan.rejected:
            done(r)
        if not plan.chunks:
            busy[k] = False   # nothing schedulable; the next arrival here restarts it
            return
        busy[k] = True
        seq += 1
        heapq.heappush(heap, (now + result.duration, seq, k, plan, result))

    i = 0
    last_arrival = -_INF
    nxt = next(arrivals, None)
    while nxt is not None or heap:
        t_arr = nxt.arrival if nxt is not None else _INF
        if heap and heap[0][0] <= t_arr:
            end, _, k, plan, result = heapq.heappop(heap)
            for r in instances[k].end_step(plan, result, end):
                done(r)
            if mark is not None:
                mark(k)
            end_time = end
            start(k, end)
            continue
        req = nxt
        nxt = next(arrivals, None)
        now = req.arrival
        if now < last_arrival:
            raise ValueError(f"requests must come in arrival order with keep_requests=False "
                             f"({req.request_id} at {now} after {last_arrival})")
        last_arrival = now
        req.user_data = i
        inflight[i] = req
        i += 1
        if n_inst == 1:
            k = 0
        elif route is not None:
            k = route(i - 1)
        else:
            views = loads.refresh(now) if loads is not None else [None] * n_inst  # type: ignore[union-attr]
            # names only where there are some: a router written before them still runs
            k = (router.choose(req.prompt_len, views) if req.block_hashes is None  # type: ignore[arg-type]
                 else router.choose(req.prompt_len, views, block_hashes=req.block_hashes))  # type: ignore[arg-type]
        instance_of.append(k)
        try:
            instances[k].add(req, now)
        except ValueError as e:
            req.state = RequestState.ABORTED
            req.finish_reason = f"rejected: {e}"
            req.finish_time = now
            rejected += 1
            if mark is not None:
                mark(k)       # the router counted the send: the next load it reads is new
            done(req)
            continue
        if mark is not None:
            mark(k)
        assigned[k] += 1
        if req.state is RequestState.REJECTED:   # refused on arrival (late=reject)
            done(req)
        if not busy[k]:
            start(k, now)
        if progress is not None and (i & 511) == 0:
            progress(i)
    if progress is not None:
        progress(i)

    unfinished = 0
    for j in sorted(inflight):
        r = inflight[j]
        if not r.finished:
            unfinished += 1
            r.state = RequestState.ABORTED
            r.finish_reason = "unfinished: the scheduler could not make progress"
        done(r)
    return SimOutcome(
        requests=kept,
        end_time=end_time,
        wall_time=time.perf_counter() - t0,
        cpu_time=time.process_time() - c0,
        steps=[inst.scheduler.stats.steps for inst in instances],
        busy_time=[getattr(inst.executor, "busy_time", 0.0) for inst in instances],
        assigned=assigned,
        preemptions=sum(inst.scheduler.stats.preemptions for inst in instances),
        rejected=rejected,
        unfinished=unfinished,
        num_requests=i,
        instance_of=instance_of,
    )
