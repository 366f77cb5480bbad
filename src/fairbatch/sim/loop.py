"""The discrete-event loop: arrivals and step ends, in time order, for N instances.

Each instance runs one step at a time: the step is planned and executed at its start
(``Instance.begin_step``) and accounted at its end (``Instance.end_step``), so requests
arriving meanwhile queue exactly as they would on a real engine, and a router reading
an instance's load mid-step sees the state a real one would report.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fairbatch.cluster.routing import Router
from fairbatch.instance import Instance
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.base import Load

_INF = float("inf")


@dataclass
class SimOutcome:
    requests: list[Request]                 # every request, in arrival order
    end_time: float                         # virtual time the last step ended
    wall_time: float                        # seconds the simulation took
    cpu_time: float = 0.0                   # CPU seconds of this process (robust to a busy machine)
    steps: list[int] = field(default_factory=list)          # per instance
    busy_time: list[float] = field(default_factory=list)    # per instance, virtual seconds
    assigned: list[int] = field(default_factory=list)       # requests routed to each instance
    preemptions: int = 0
    rejected: int = 0                       # refused at admission (e.g. longer than the context)
    unfinished: int = 0                     # still pending when the simulation gave up


class _LoadCache:
    """Loads as a router sees them: refreshed at most every ``interval`` seconds."""

    def __init__(self, instances: Sequence[Instance], interval: float) -> None:
        self.instances = instances
        self.interval = interval
        self.loads: list[Load | None] = [None] * len(instances)

    def get(self, now: float) -> list[Load]:
        out = []
        for k, inst in enumerate(self.instances):
            ld = self.loads[k]
            if ld is None or now - ld.time >= self.interval:
                ld = self.loads[k] = inst.load(now)
            out.append(ld)
        return out


def simulate(
    requests: Sequence[Request],
    instances: Sequence[Instance],
    router: Router | None = None,
    *,
    load_interval: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> SimOutcome:
    """Run ``requests`` (any order; sorted here by arrival) through ``instances``.

    With several instances a ``router`` picks one per arrival from their loads, which
    are at most ``load_interval`` seconds old. ``progress(n)`` is called now and then with
    the number of requests that have arrived.
    """
    if not instances:
        raise ValueError("need at least one instance")
    if len(instances) > 1 and router is None:
        raise ValueError("several instances need a router")
    t0 = time.perf_counter()
    c0 = time.process_time()
    reqs = sorted(requests, key=lambda r: r.arrival)
    n = len(reqs)
    n_inst = len(instances)
    busy = [False] * n_inst
    assigned = [0] * n_inst
    heap: list[tuple[float, int, int, object, object]] = []
    seq = 0
    rejected = 0
    end_time = 0.0
    cache = _LoadCache(instances, load_interval) if router is not None and router.uses_load else None

    def start(k: int, now: float) -> None:
        nonlocal seq
        inst = instances[k]
        if not inst.has_work():
            busy[k] = False
            return
        plan, result = inst.begin_step(now)
        if not plan.chunks:
            busy[k] = False   # nothing schedulable; the next arrival here restarts it
            return
        busy[k] = True
        seq += 1
        heapq.heappush(heap, (now + result.duration, seq, k, plan, result))

    i = 0
    while i < n or heap:
        t_arr = reqs[i].arrival if i < n else _INF
        if heap and heap[0][0] <= t_arr:
            end, _, k, plan, result = heapq.heappop(heap)
            instances[k].end_step(plan, result, end)
            end_time = end
            start(k, end)
            continue
        req = reqs[i]
        i += 1
        now = req.arrival
        if n_inst == 1:
            k = 0
        else:
            loads = cache.get(now) if cache is not None else [None] * n_inst  # type: ignore[list-item]
            k = router.choose(req.prompt_len, loads)  # type: ignore[union-attr]
        try:
            instances[k].add(req, now)
        except ValueError as e:
            req.state = RequestState.ABORTED
            req.finish_reason = f"rejected: {e}"
            req.finish_time = now
            rejected += 1
            continue
        assigned[k] += 1
        if not busy[k]:
            start(k, now)
        if progress is not None and (i & 511) == 0:
            progress(i)
    if progress is not None:
        progress(n)

    unfinished = 0
    for r in reqs:
        if not r.finished:
            unfinished += 1
            r.state = RequestState.ABORTED
            r.finish_reason = "unfinished: the scheduler could not make progress"
    return SimOutcome(
        requests=reqs,
        end_time=end_time,
        wall_time=time.perf_counter() - t0,
        cpu_time=time.process_time() - c0,
        steps=[inst.scheduler.stats.steps for inst in instances],
        busy_time=[getattr(inst.executor, "busy_time", 0.0) for inst in instances],
        assigned=assigned,
        preemptions=sum(inst.scheduler.stats.preemptions for inst in instances),
        rejected=rejected,
        unfinished=unfinished,
    )
