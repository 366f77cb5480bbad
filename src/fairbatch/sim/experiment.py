"""Simulation experiments: a Scenario (trace x model x GPU x SLOs x cluster) run under a
policy at a rate scale, and the capacity search over rate scales.

The trace is read, truncated and given its SLOs once (``prepare``); each run then only
re-times arrivals and builds fresh Request objects, so a capacity search costs little
beyond the simulations themselves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from fairbatch.routing import make_router
from fairbatch.instance import Executor, Instance
from fairbatch.kv import BlockAllocator, trace_block_hashes
from fairbatch.latency.base import LatencyModel
from fairbatch.latency.profiles import load_latency_model
from fairbatch.metrics import CapacityResult, find_capacities, find_capacity
from fairbatch.metrics.records import record_from_request
from fairbatch.metrics.stream import StreamingSummary
from fairbatch.request import SLO, DeadlineRule, Request
from fairbatch.scheduler.base import SchedulerConfig, make_scheduler
from fairbatch.scheduler.variant import parse_variant
from fairbatch.sim.executor import SimExecutor
from fairbatch.sim.loop import SimOutcome, simulate
from fairbatch.specs import get_gpu, get_model, kv_cache_blocks
from fairbatch.workload import (
    GammaArrivals,
    TraceEntry,
    assign_slos,
    load_trace,
    make_requests,
    mean_rate,
    parse_slo_classes,
    scale_rate,
    truncate_to_context,
)

BLOCK_SIZE = 16          # KV block size of the simulated engine (vLLM's default)
DEFAULT_TTFT_SLO = 1.0    # seconds; see docs/RESULTS.md for the tighter/looser pairs
DEFAULT_TPOT_SLO = 0.05


@dataclass
class Scenario:
    """Everything about a simulation except the policy and the rate scale."""

    trace: str = "azure-conv"
    num_requests: int | None = None
    request_rate: float | None = None       # re-time arrivals (needed for lengths-only traces)
    burstiness: float = 1.0                 # gamma shape of those arrivals; 1 = Poisson
    model: str = "llama-3-8b"
    gpu: str = "h100"
    profile: str | None = None              # latency profile JSON; default: shipped or roofline
    ttft_slo: float = DEFAULT_TTFT_SLO
    tpot_slo: float = DEFAULT_TPOT_SLO
    slo_classes: str | None = None          # "name:ttft:tpot:share,..."
    slo_by_tag: str | None = None           # "TAG=name:ttft:tpot,...": SLO class from the trace's tag
    deadline_rule: str = DeadlineRule.TPOT_SAFE.value
    instances: int = 1
    router: str = "round_robin"
    load_interval: float = 0.0              # how stale the router's loads may be (s)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None        # default: the model's context, at most 8192
    seed: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)   # SchedulerConfig overrides
    # reuse the KV of prompt prefixes the trace names as shared (hash ids), as vLLM does by
    # default; a trace without hash ids runs exactly as without it
    prefix_caching: bool = True
    # seconds a served stack adds to what its clients see (request in, HTTP/IPC, streaming
    # out), judged and not scheduled: each request counts as sent this long before the
    # simulated engine saw it, so TTFT and e2e grow by it and TPOT does not. A served
    # run's measured value is serve_bench_device.py's served_offset_ms
    served_offset: float = 0.0
    # spread of that delay: 0 = the same for every request, else each request's is drawn
    # from a gamma distribution with this coefficient of variation (1: exponential) and
    # mean served_offset (seeded by ``seed``). A served stack delivers a step's tokens in a
    # burst, so some first tokens wait much longer than the mean: with the same mean, a
    # spread of 1 reproduced the H200 runs of 2026-12-07 where a constant did not
    served_offset_cv: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    scenario: Scenario
    entries: list[TraceEntry]
    slos: list[SLO]
    latency: LatencyModel
    num_blocks: int
    config: SchedulerConfig
    base_rate: float                         # the trace's mean request rate at scale 1
    truncated: int
    # each entry's KV block names (prefix caching on and the trace names prefixes), else None
    block_hashes: list[list[int] | None] | None = None


@dataclass
class RunResult:
    policy: str
    rate_scale: float
    summary: dict[str, Any]
    outcome: SimOutcome

    def row(self) -> dict[str, Any]:
        """The JSON row of this run: policy, rates, and every summary key."""
        return {"policy": self.policy, "rate_scale": self.rate_scale, **self.summary}


def _parse_tag_map(spec: str) -> dict[str, SLO]:
    out: dict[str, SLO] = {}
    for part in spec.split(","):
        tag, sep, cls = part.partition("=")
        fields = cls.split(":")
        if not sep or len(fields) != 3:
            raise ValueError(f"bad SLO tag mapping {part!r}: expected TAG=name:TTFT_s:TPOT_s")
        try:
            out[tag.strip()] = SLO(float(fields[1]), float(fields[2]), fields[0].strip())
        except ValueError as e:
            raise ValueError(f"bad SLO tag mapping {part!r}: {e}") from None
    return out


def prepare(sc: Scenario) -> Prepared:
    """Read the trace and resolve model, GPU, KV capacity and SLOs once."""
    model = get_model(sc.model)
    gpu = get_gpu(sc.gpu)
    max_len = sc.max_model_len or min(model.max_position_embeddings, 8192)
    arrival = GammaArrivals(sc.request_rate, sc.burstiness) if sc.request_rate else None
    entries = load_trace(sc.trace, arrival=arrival, num_requests=sc.num_requests, seed=sc.seed)
    entries, truncated = truncate_to_context(entries, max_len)
    default = SLO(sc.ttft_slo, sc.tpot_slo, "default")
    if sc.slo_classes and sc.slo_by_tag:
        raise ValueError("give --slo-classes or --slo-by-tag, not both")
    if sc.slo_classes:
        slos = assign_slos(entries, default=default, classes=parse_slo_classes(sc.slo_classes), seed=sc.seed)
    elif sc.slo_by_tag:
        slos = assign_slos(entries, default=default, tag_map=_parse_tag_map(sc.slo_by_tag))
    else:
        slos = assign_slos(entries, default=default)
    latency = load_latency_model(sc.model, sc.gpu, sc.profile)
    num_blocks = kv_cache_blocks(model, gpu, gpu_memory_utilization=sc.gpu_memory_utilization)
    # Policies read each request's own SLO; the config's is the default for requests
    # without one, as in the server. Sarathi's budget recipe is sized, as its authors
    # size it, for the tightest TPOT served.
    unknown = sorted(set(sc.scheduler) - {f.name for f in fields(SchedulerConfig)})
    if unknown:
        raise ValueError(f"unknown scheduler option {unknown[0]!r}")
    cfg = SchedulerConfig(**{"max_model_len": max_len, "ttft_slo": sc.ttft_slo, "tpot_slo": sc.tpot_slo,
                             "chunk_recipe_tpot": min(s.tpot for s in slos) if slos else sc.tpot_slo,
                             **sc.scheduler})
    if sc.instances < 1:
        raise ValueError("instances must be >= 1")
    if not sc.served_offset >= 0:
        raise ValueError(f"served_offset must be >= 0 seconds, got {sc.served_offset}")
    if not sc.served_offset_cv >= 0:
        raise ValueError(f"served_offset_cv must be >= 0, got {sc.served_offset_cv}")
    make_router(sc.router)   # validate early
    hashes = None
    if sc.prefix_caching and any(e.hash_ids is not None for e in entries):
        hashes = [trace_block_hashes(e.hash_ids, e.prompt_len, BLOCK_SIZE) if e.hash_ids is not None else None
                  for e in entries]
    return Prepared(sc, entries, slos, latency, num_blocks, cfg, mean_rate(entries), truncated, hashes)


@lru_cache(maxsize=4)
def prepare_json(scenario_json: str) -> Prepared:
    """``prepare`` of a Scenario sent as JSON, cached: worker processes of a pool receive
    the scenario once per job and prepare it once."""
    return prepare(Scenario(**json.loads(scenario_json)))


def run_policy(prep: Prepared, policy: str, rate_scale: float = 1.0,
               progress: Callable[[int], None] | None = None,
               make_executor: Callable[[LatencyModel, int], Executor] | None = None) -> RunResult:
    """One simulation of ``policy`` (a name, or a variant ``"sarathi:chunk_size=1536"``).
    ``make_executor(model, k)`` builds instance k's executor (default: steps take exactly
    what the model predicts)."""
    sc = prep.scenario
    variant = parse_variant(policy)
    entries = scale_rate(prep.entries, rate_scale) if rate_scale != 1.0 else prep.entries
    requests = make_requests(entries, prep.slos, deadline_rule=DeadlineRule(sc.deadline_rule))
    if prep.block_hashes is not None:
        for req, names in zip(requests, prep.block_hashes, strict=True):
            req.block_hashes = names      # read-only: shared by every run of the scenario
    instances = []
    for k in range(sc.instances):
        cfg = variant.config(prep.config)
        # a trace without names has nothing to reuse: the plain allocator, as fast as before
        alloc = BlockAllocator(prep.num_blocks, BLOCK_SIZE, prefix_caching=prep.block_hashes is not None)
        sched = make_scheduler(variant.name, cfg, alloc, prep.latency)
        executor = make_executor(prep.latency, k) if make_executor else SimExecutor(prep.latency)
        instances.append(Instance(sched, executor, name=f"instance-{k}"))
    router = make_router(sc.router) if sc.instances > 1 else None
    # each request is summarised as it leaves (metrics.stream), as in a run too large to keep
    stream = StreamingSummary()
    on_done = stream.add_request
    if sc.served_offset:
        offsets = served_offsets(sc, len(requests))

        def on_done(index: int, req: Request) -> None:
            rec = record_from_request(req)
            stream.add(replace(rec, arrival=rec.arrival - offsets[index]), index)
            if req.first_token_time is not None:   # what a server measures and reports
                for inst in instances:
                    inst.scheduler.observe_delivery(offsets[index])
    outcome = simulate(requests, instances, router, load_interval=sc.load_interval, progress=progress,
                       on_done=on_done)
    summary = stream.summary()
    summary["request_rate"] = prep.base_rate * rate_scale
    summary["num_preemptions"] = outcome.preemptions
    summary["sim_wall_time_s"] = outcome.wall_time
    if prep.block_hashes is not None:     # prompt tokens found cached at first admission
        queries = sum(inst.scheduler.allocator.prefix_queries for inst in instances)
        hits = sum(inst.scheduler.allocator.prefix_hits for inst in instances)
        summary["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
    if sc.instances > 1:
        summary["requests_per_instance"] = outcome.assigned
    return RunResult(policy, rate_scale, summary, outcome)


def served_offsets(sc: Scenario, n: int) -> np.ndarray:
    """Each request's served-stack delay (``Scenario.served_offset``/``served_offset_cv``),
    the same draws for every policy and load of a scenario."""
    if not sc.served_offset_cv:
        return np.full(n, sc.served_offset)
    shape = 1.0 / sc.served_offset_cv ** 2
    return np.random.default_rng(sc.seed).gamma(shape, sc.served_offset / shape, n)


def capacities(prep: Prepared, policy: str, *, targets: tuple[float, ...] = (0.9, 0.99), lo: float = 1.0,
               rel_tol: float = 0.02) -> dict[float, CapacityResult]:
    """Highest rate scale meeting each attainment target (runs shared between targets)."""
    return find_capacities(lambda s: run_policy(prep, policy, s).summary, lo=lo, targets=targets, rel_tol=rel_tol)


def capacity(prep: Prepared, policy: str, *, target: float = 0.9, lo: float = 1.0,
             hi: float | None = None, rel_tol: float = 0.02,
             on_point: Callable[[float, float, dict], None] | None = None) -> CapacityResult:
    """Highest rate scale whose SLO attainment is at least ``target``."""
    return find_capacity(lambda s: run_policy(prep, policy, s).summary, lo=lo, hi=hi,
                         target=target, rel_tol=rel_tol, on_point=on_point)
