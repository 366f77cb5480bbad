"""Cluster simulations in bounded memory, and split over processes where that is exact.

A ``Workload`` is a run's requests as arrays (arrival, prompt and output lengths, SLO);
Request objects are built one at a time as the loop reaches them and summarised as they
leave (``metrics.stream``), so a million requests cost a few arrays, not a million
objects and their token times.

**Splitting** (``jobs`` > 1). Instances interact only through the router. A router that
reads no load (``Router.uses_load`` false: ``round_robin``) decides from the arrival order
alone, so every decision is made first, in one pass, and each process then simulates its
own instances on their own requests: the same trajectories, step for step, as one process
running them all (the tests compare summaries to the bit). A load-aware router
(``least_requests``, ``llumnix``, ``admission``) decides each arrival from every
instance's state at that moment, which depends on every earlier decision and step; no
split of the instances reproduces that, and an approximate one (e.g. routing on loads
exchanged every few milliseconds) would be a different router. Those run in one process
(``split_reason`` says why), whatever ``jobs`` is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, overload

import numpy as np
import numpy.typing as npt

from fairbatch.routing import make_router
from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.latency.base import LatencyModel
from fairbatch.metrics.stream import StreamingSummary
from fairbatch.request import SLO, DeadlineRule, Request
from fairbatch.scheduler.base import SchedulerConfig, make_scheduler
from fairbatch.scheduler.variant import parse_variant
from fairbatch.sim.executor import SimExecutor
from fairbatch.sim.loop import simulate


class TiledBlockNames(Sequence):
    """Block names of a workload that re-sends a trace's requests: request ``i`` is trace
    entry ``entry[i]``, its names that entry's (``base``) plus ``offset[i]``. A tiling of
    the trace gives each copy its own offset (a multiple of ``stride``, above every base
    name), so copies share nothing with one another. Names are built when a request is
    made (``Workload.requests``), so a million requests hold two arrays, not a million
    lists of names."""

    def __init__(self, base: Sequence[Sequence[int] | None], entry: npt.NDArray[np.int64],
                 offset: npt.NDArray[np.int64]) -> None:
        if len(entry) != len(offset):
            raise ValueError("entry and offset must have one value per request")
        self.base = base
        self.entry = entry
        self.offset = offset

    @staticmethod
    def stride(base: Sequence[Sequence[int] | None]) -> int:
        """An offset step above every name in ``base``."""
        return 1 + max((max(b) for b in base if b), default=0)

    def __len__(self) -> int:
        return len(self.entry)

    @overload
    def __getitem__(self, i: int) -> list[int] | None: ...
    @overload
    def __getitem__(self, i: slice) -> list[list[int] | None]: ...
    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        names = self.base[int(self.entry[i])]
        if names is None:
            return None
        off = int(self.offset[i])
        return list(names) if not off else [n + off for n in names]

    def take(self, idx: npt.NDArray[np.int64]) -> TiledBlockNames:
        return TiledBlockNames(self.base, self.entry[idx], self.offset[idx])


@dataclass
class Workload:
    """A run's requests in arrival order, as arrays (one SLO for all); ``block_hashes``: each
    request's KV block names (``kv.trace_block_hashes``) for prefix caching, or None (a
    list, or a ``TiledBlockNames`` that builds them as requests are made)."""

    arrival: npt.NDArray[np.float64]
    prompt_len: npt.NDArray[np.int32]
    output_len: npt.NDArray[np.int32]
    slo: SLO
    deadline_rule: DeadlineRule = DeadlineRule.TPOT_SAFE
    block_hashes: Sequence[list[int] | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.arrival)
        if not (len(self.prompt_len) == len(self.output_len) == n):
            raise ValueError("arrival, prompt_len and output_len must have one entry per request")
        if n > 1 and not (np.diff(self.arrival) >= 0).all():
            raise ValueError("arrivals must be sorted")
        if self.block_hashes is not None and len(self.block_hashes) != n:
            raise ValueError("block_hashes must have one entry per request")

    def __len__(self) -> int:
        return len(self.arrival)

    def subset(self, idx: npt.NDArray[np.int64]) -> Workload:
        names = self.block_hashes
        if isinstance(names, TiledBlockNames):
            sub: Sequence[list[int] | None] | None = names.take(idx)
        else:
            sub = None if names is None else [names[i] for i in idx.tolist()]
        return Workload(self.arrival[idx], self.prompt_len[idx], self.output_len[idx], self.slo, self.deadline_rule, sub)

    def requests(self) -> Iterator[Request]:
        """One Request at a time (the loop keeps only those in flight)."""
        slo, rule, names = self.slo, self.deadline_rule, self.block_hashes
        for i, (a, p, o) in enumerate(zip(self.arrival.tolist(), self.prompt_len.tolist(),
                                          self.output_len.tolist())):
            req = Request(f"r{i}", a, p, o, slo, deadline_rule=rule)
            if names is not None:
                req.block_hashes = names[i]
            yield req


@dataclass
class Cluster:
    """Everything to build the instances: policy (or variant), scheduler config, KV blocks,
    latency model, router spec, load staleness."""

    policy: str
    config: SchedulerConfig
    num_blocks: int
    latency: LatencyModel
    router: str = "round_robin"
    load_interval: float = 0.0
    prefix_caching: bool = False     # the caching allocator (for workloads with block names)

    def instances(self, n: int) -> list[Instance]:
        variant = parse_variant(self.policy)
        return [Instance(make_scheduler(variant.name, variant.config(self.config),
                                        BlockAllocator(self.num_blocks, 16, prefix_caching=self.prefix_caching),
                                        self.latency), SimExecutor(self.latency), name=f"instance-{k}")
                for k in range(n)]


@dataclass
class SplitResult:
    summary: StreamingSummary
    instances: int
    jobs: int                                   # processes actually used
    wall_time: float
    end_time: float = 0.0
    steps: list[int] = field(default_factory=list)
    busy_time: list[float] = field(default_factory=list)
    assigned: list[int] = field(default_factory=list)
    preemptions: int = 0
    rejected: int = 0
    unfinished: int = 0
    prefix_queries: int = 0       # prompt tokens looked up at first admission, all instances
    prefix_hits: int = 0          # and found cached (0, 0 without prefix caching)


def split_reason(router: str) -> str | None:
    """None if runs with this router can be split over processes exactly, else why not."""
    if make_router(router).uses_load:
        return (f"router {router!r} reads every instance's load at each arrival: its decisions depend on the "
                "whole cluster's state, so instances cannot be simulated apart (one process)")
    return None


def _run_group(cluster: Cluster, work: Workload, gidx: npt.NDArray[np.int64] | None,
               route: npt.NDArray[np.int32] | None, n_inst: int, start: float) -> SplitResult:
    """Simulate ``n_inst`` instances on ``work``; ``route``: each request's (local) instance,
    decided in advance, else the cluster's router decides; ``gidx``: each request's index
    in the whole run (None: the same)."""
    t0 = time.perf_counter()
    instances = cluster.instances(n_inst)
    stream = StreamingSummary(start=start)
    if gidx is None:
        on_done = stream.add_request
    else:
        g = gidx.tolist()
        def on_done(j: int, req: Request) -> None:
            stream.add_request(g[j], req)
    router = make_router(cluster.router) if route is None and n_inst > 1 else None
    r = route.tolist() if route is not None else None
    out = simulate(work.requests(), instances, router, load_interval=cluster.load_interval,
                   keep_requests=False, on_done=on_done, route=r.__getitem__ if r is not None else None)
    stream.flush()
    allocs = [inst.scheduler.allocator for inst in instances]
    return SplitResult(stream, n_inst, 1, time.perf_counter() - t0, out.end_time, out.steps, out.busy_time,
                       out.assigned, out.preemptions, out.rejected, out.unfinished,
                       sum(a.prefix_queries for a in allocs), sum(a.prefix_hits for a in allocs))


def _run_group_args(args: tuple) -> SplitResult:
    return _run_group(*args)


def run_cluster(cluster: Cluster, work: Workload, n_inst: int, *, jobs: int = 1) -> SplitResult:
    """Simulate ``work`` on ``n_inst`` instances; over ``jobs`` processes when the router
    allows it exactly (``split_reason``), else in this one."""
    t0 = time.perf_counter()
    start = float(work.arrival[0]) if len(work) else 0.0
    if jobs <= 1 or n_inst <= 1 or split_reason(cluster.router) is not None:
        res = _run_group(cluster, work, None, None, n_inst, start)
        res.wall_time = time.perf_counter() - t0
        return res
    # every decision first: a router that reads no load sees only the prompt lengths, in order
    router = make_router(cluster.router)
    idle = [None] * n_inst
    choose = router.choose
    names = work.block_hashes
    picks = (choose(p, idle) for p in work.prompt_len.tolist()) if names is None else \
        (choose(p, idle, block_hashes=h) for p, h in zip(work.prompt_len.tolist(), names))
    inst = np.fromiter(picks, np.int32, len(work))  # type: ignore[arg-type]
    jobs = min(jobs, n_inst)
    groups = [list(range(j, n_inst, jobs)) for j in range(jobs)]   # instances of each process
    args = []
    for g in groups:
        local = np.full(n_inst, -1, np.int32)
        local[g] = np.arange(len(g), dtype=np.int32)
        gidx = np.flatnonzero(local[inst] >= 0)
        args.append((cluster, work.subset(gidx), gidx, local[inst[gidx]], len(g), start))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        parts = list(pool.map(_run_group_args, args))
    total = SplitResult(StreamingSummary(start=start), n_inst, jobs, 0.0)
    steps = [0] * n_inst
    busy = [0.0] * n_inst
    assigned = [0] * n_inst
    for g, part in zip(groups, parts, strict=True):
        total.summary.merge(part.summary)
        for loc, k in enumerate(g):
            steps[k], busy[k], assigned[k] = part.steps[loc], part.busy_time[loc], part.assigned[loc]
        total.end_time = max(total.end_time, part.end_time)
        total.preemptions += part.preemptions
        total.rejected += part.rejected
        total.unfinished += part.unfinished
        total.prefix_queries += part.prefix_queries
        total.prefix_hits += part.prefix_hits
    total.steps, total.busy_time, total.assigned = steps, busy, assigned
    total.wall_time = time.perf_counter() - t0
    return total
