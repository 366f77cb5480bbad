"""Trace replay against an OpenAI-compatible server: build the requests, send each at its
arrival time, collect records, summarise with the simulator's metrics module.

The JSON a run writes is ``vllm bench serve``'s result (same keys, same meanings: the
summary comes from ``fairbatch.metrics.summarize``, which is matched against vLLM), plus
``slo_attainment`` / ``envelope_attainment`` / ``per_class``, plus the simulator report's
``scenario`` / ``runs`` / ``capacity`` layout so that a bench report and a ``fairbatch
simulate`` report of the same trace can be read by the same code.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

import aiohttp
import httpx
import numpy as np

from fairbatch.bench.client import BenchRequest, make_payload, open_session, send_request
from fairbatch.bench.datasets import load_text_dataset
from fairbatch.bench.event_loop import run as run_loop
from fairbatch.bench.prefix_prompts import prompt_key, shared_prompt_tokens, trace_prompt
from fairbatch.bench.prometheus_text import samples
from fairbatch.bench.vllm_compat import (
    itl_summary,
    keep_percentile_metrics,
    max_concurrent_requests,
    normalize_arrivals,
    random_entries,
)
from fairbatch.metrics import DEFAULT_PERCENTILES, RequestRecord, find_capacities, summarize
from fairbatch.metrics.summary import LATENCY_METRICS
from fairbatch.metrics.records import REJECTED
from fairbatch.request import SLO
from fairbatch.workload import (
    GammaArrivals,
    TraceEntry,
    TraceError,
    assign_slos,
    load_trace,
    mean_rate,
    parse_slo_classes,
    retime,
    truncate_to_context,
)

PROMPT_ID_LOW, PROMPT_ID_HIGH = 1, 100     # token ids drawn from [1, 100]: inside any vocabulary


class BenchError(ValueError):
    """A user-facing problem (unreachable server, unknown model, bad option)."""


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None                    # None: the server's first model
    trace: str = "azure-conv"
    num_prompts: int | None = 1000              # None: the whole trace
    rate_scale: float = 1.0                     # trace arrivals compressed by this
    request_rate: float | None = None           # re-time with a gamma process at this rate
    burstiness: float = 1.0
    ttft_slo: float = 1.0                       # seconds
    tpot_slo: float = 0.05
    slo_classes: str | None = None
    max_model_len: int | None = None            # default: the server's (from /v1/models), if it says
    max_concurrency: int | None = None
    send_slo: bool = True                       # put each request's SLO in its body (our server reads it)
    ignore_eos: bool = True
    seed: int = 0
    prompt_salt: int = 0                        # > 0: prompts sharing nothing with another salt's (same trace)
    timeout: float = 6 * 3600.0
    label: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    warmup: bool = True                          # one request before the run (checks the server, too)
    # client processes: one Python event loop spends ~146 us of CPU per streamed token,
    # so near 7,000 tokens/s the client, not the server, sets TTFT
    workers: int = 1
    # vllm bench serve's options
    dataset_name: str | None = None             # random: lengths below instead of a trace
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    dataset_path: str | None = None              # sharegpt / custom: the file
    sharegpt_output_len: int | None = None
    custom_output_len: int = 256
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    percentile_metrics: tuple[str, ...] = LATENCY_METRICS
    goodput: bool = True                        # report request_goodput (vLLM: only with --goodput)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Workload:
    entries: list[TraceEntry]                   # arrivals at scale 1
    requests: list[BenchRequest]
    base_rate: float                            # request rate at scale 1
    truncated: int
    model: str
    server_info: dict[str, Any]
    texts: list[list[int]] | None = None        # a text dataset's prompts (kept as they are on a new salt)
    salt: int = 0                               # prompts of replay ``salt`` (``with_salt``)
    shared_tokens: int | None = None            # prompt tokens an unbounded cache would reuse (None: not counted)


@dataclass
class ClientTimes:
    """What the client saw besides the records: every request's stream-event times (vLLM's
    ITLs are per event) and its queue time (sent this long after it was due: the
    ``--max-concurrency`` wait and the client's own lag; vLLM's ``queue_times``)."""

    events: dict[str, list[float]] = field(default_factory=dict)
    queue: dict[str, float] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)   # usage.prompt_tokens_details.cached_tokens, if given

    def update(self, other: "ClientTimes") -> None:
        self.events.update(other.events)
        self.queue.update(other.queue)
        self.cached.update(other.cached)


@dataclass
class RunOutcome:
    rate_scale: float
    summary: dict[str, Any]
    records: list[RequestRecord]
    times: ClientTimes = field(default_factory=ClientTimes)


def _url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def server_models(cfg: BenchConfig) -> list[dict[str, Any]]:
    try:
        r = httpx.get(_url(cfg.base_url, "/v1/models"), timeout=30.0)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach the server at {cfg.base_url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise BenchError(f"{cfg.base_url}/v1/models answered HTTP {r.status_code}")
    try:
        data = r.json().get("data") or []
    except (ValueError, AttributeError):
        raise BenchError(f"{cfg.base_url}/v1/models did not answer a model list") from None
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def prepare(cfg: BenchConfig) -> Workload:
    """Read the trace, resolve the model and context limit from the server, draw prompts."""
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise BenchError("--num-prompts must be >= 1")
    if cfg.request_rate is not None and not cfg.request_rate > 0:
        raise BenchError("--request-rate must be positive (inf: all at once)")
    if not (cfg.rate_scale > 0 and math.isfinite(cfg.rate_scale)):
        raise BenchError("--rate-scale must be a positive number")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise BenchError("--max-concurrency must be >= 1")
    if cfg.workers < 1:
        raise BenchError("--workers must be >= 1")
    if cfg.workers > 1 and cfg.max_concurrency is not None:
        raise BenchError("--max-concurrency limits one client process: use it with --workers 1")
    if not (cfg.ttft_slo > 0 and cfg.tpot_slo > 0):
        raise BenchError("SLOs must be positive")

    models = server_models(cfg)
    info: dict[str, Any] = {}
    model = cfg.model
    if model is None:
        if not models:
            raise BenchError(f"{cfg.base_url} lists no models; pass --model")
        info = models[0]
        model = info["id"]
    else:
        info = next((m for m in models if m["id"] == model), {})
        if models and not info:
            raise BenchError(f"the server does not serve {model!r} (it lists {', '.join(m['id'] for m in models)})")

    # Arrivals exactly as `fairbatch simulate` draws them (same trace, n, rate, seed: same times).
    arrival = GammaArrivals(cfg.request_rate, cfg.burstiness) if cfg.request_rate is not None else None
    texts: list[list[int]] | None = None         # a text dataset's prompts, as the server tokenizes them
    if cfg.dataset_name in ("sharegpt", "custom"):
        pairs = load_text_dataset(cfg.dataset_name, cfg.dataset_path, cfg.num_prompts or 1000, cfg.base_url, model,
                                  seed=cfg.seed, sharegpt_output_len=cfg.sharegpt_output_len,
                                  custom_output_len=cfg.custom_output_len)
        texts = [ids for ids, _ in pairs]
        entries = retime([TraceEntry(0.0, len(ids), out, None) for ids, out in pairs],
                         arrival or GammaArrivals(math.inf), seed=cfg.seed)
    elif cfg.dataset_name == "random":
        entries = retime(random_entries(cfg.num_prompts or 1000, cfg.random_input_len, cfg.random_output_len,
                                        cfg.random_range_ratio, cfg.seed), arrival or GammaArrivals(math.inf),
                         seed=cfg.seed)
    else:
        try:
            available = len(load_trace(cfg.trace, arrival=arrival or GammaArrivals(1.0), seed=cfg.seed))
            n = available if cfg.num_prompts is None else min(cfg.num_prompts, available)
            entries = load_trace(cfg.trace, arrival=arrival, num_requests=n, seed=cfg.seed)
        except TraceError as e:
            if arrival is None and "no arrival times" in str(e):
                raise BenchError(f"{cfg.trace} has request lengths but no arrival times: time it with "
                                 f"--request-rate R (and --burstiness B)") from None
            raise
    if cfg.request_rate is not None:      # the configured rate exactly, as vLLM rescales its gaps
        entries = normalize_arrivals(entries, cfg.request_rate)
    limit = cfg.max_model_len or info.get("max_model_len")
    truncated = 0
    if isinstance(limit, int) and limit >= 2:
        entries, truncated = truncate_to_context(entries, limit)
    base_rate = _rate(entries)

    default = SLO(cfg.ttft_slo, cfg.tpot_slo, "default")
    if cfg.slo_classes:
        slos = assign_slos(entries, default=default, classes=parse_slo_classes(cfg.slo_classes), seed=cfg.seed)
    else:
        slos = assign_slos(entries, default=default)
    if cfg.prompt_salt < 0:
        raise BenchError("--prompt-salt must be >= 0")
    prompts = make_prompts(cfg, entries, texts, cfg.prompt_salt)
    requests = [BenchRequest(f"bench-{i}", e.arrival, ids, e.output_len, slo)
                for i, (e, slo, ids) in enumerate(zip(entries, slos, prompts, strict=True))]
    wl = Workload(entries, requests, base_rate, truncated, model, info, texts, cfg.prompt_salt)
    if texts is not None or any(e.hash_ids is not None for e in entries):   # random prompts share nothing
        wl.shared_tokens = shared_prompt_tokens([(e.hash_ids, r.prompt_ids, r.prompt_len)
                                                 for e, r in zip(entries, requests, strict=True)],
                                                server_block_size(info))
    else:
        wl.shared_tokens = 0
    return wl


def server_block_size(info: dict[str, Any]) -> int:
    """The KV block size a fairbatch server names in ``/v1/models`` (if it divides the
    trace's 512-token blocks), else 16 (vLLM's and fairbatch's default)."""
    b = (info.get("fairbatch") or {}).get("block_size")
    return b if isinstance(b, int) and not isinstance(b, bool) and b >= 1 and 512 % b == 0 else 16


def make_prompts(cfg: BenchConfig, entries: list[TraceEntry], texts: list[list[int]] | None,
                 salt: int = 0) -> list[list[int]]:
    """Each entry's prompt token ids: a text dataset's (cut to the entry's length); a
    traced prompt with ``hash_ids`` built from them (``prefix_prompts``: the same id, the
    same tokens); otherwise random ids. ``salt`` > 0: the prompts of another replay, which
    share nothing with salt 0's (a server's prefix cache must not carry one capacity
    point's prompts into the next)."""
    rng = np.random.default_rng(cfg.seed if salt == 0 else [cfg.seed, salt])
    key = prompt_key(cfg.seed, salt)
    out = []
    for i, e in enumerate(entries):
        if texts is not None:
            out.append(texts[i][:e.prompt_len])     # truncated to the context like the trace's lengths
        elif e.hash_ids is not None:
            out.append(trace_prompt(e.hash_ids, e.prompt_len, key))
        else:
            out.append(rng.integers(PROMPT_ID_LOW, PROMPT_ID_HIGH + 1, size=e.prompt_len).tolist())
    return out


def point_salt(salt: int, k: int) -> int:
    """The salt of point ``k`` of a capacity search run with ``--prompt-salt salt``:
    ``salt`` for the first, distinct for every (salt, k)."""
    return salt if k == 0 else ((salt + 1) << 20) + k


def with_salt(cfg: BenchConfig, wl: Workload, salt: int) -> Workload:
    """The workload with the prompts of replay ``salt`` (same lengths, arrivals, SLOs, the
    same sharing within the replay). Text-dataset prompts cannot change: they stay."""
    if salt == wl.salt or wl.texts is not None:
        return wl
    prompts = make_prompts(cfg, wl.entries, None, salt)
    reqs = [replace(r, prompt_ids=ids) for r, ids in zip(wl.requests, prompts, strict=True)]
    return replace(wl, requests=reqs, salt=salt)


def _rate(entries: list[TraceEntry]) -> float:
    if len(entries) < 2:
        return math.inf
    return mean_rate(entries)


async def _warmup(client: aiohttp.ClientSession, url: str, cfg: BenchConfig, model: str, like: BenchRequest) -> None:
    """One short request before the run: checks the server and warms its connection."""
    # under one KV block of 16: the probe leaves no cached block behind for the run
    probe = BenchRequest("warmup", 0.0, like.prompt_ids[:8] or [1], 2, like.slo)
    rec = await send_request(client, url, probe, make_payload(probe, model, send_slo=cfg.send_slo,
                                                              ignore_eos=cfg.ignore_eos, extra_body=cfg.extra_body))
    if not rec.success and rec.error != REJECTED:     # refused in time (429): the server works
        raise BenchError(f"the test request to {url} failed: {rec.error}")


async def _warmup_alone(cfg: BenchConfig, wl: Workload) -> None:
    async with open_session(cfg.timeout) as client:
        await _warmup(client, _url(cfg.base_url, cfg.endpoint), cfg, wl.model, wl.requests[0])


async def _run_async(cfg: BenchConfig, wl: Workload, rate_scale: float,
                     on_done: Callable[[RequestRecord], None] | None, *, warmup: bool = True,
                     start: float | None = None, on_start: Callable[[], None] | None = None
                     ) -> tuple[list[RequestRecord], float, ClientTimes]:
    """Send ``wl.requests`` at ``start + arrival / rate_scale`` (``start``: now, or a
    ``perf_counter`` time shared with other client processes: CLOCK_MONOTONIC, host-wide).
    ``on_start`` runs after the warm-up, before the first request."""
    url = _url(cfg.base_url, cfg.endpoint)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    times = ClientTimes()
    events = times.events
    async with open_session(cfg.timeout, cfg.max_concurrency) as client:
        if warmup and cfg.warmup:
            await _warmup(client, url, cfg, wl.model, wl.requests[0])
        if on_start is not None:
            on_start()

        async def one(req: BenchRequest) -> RequestRecord:
            payload = make_payload(req, wl.model, send_slo=cfg.send_slo, ignore_eos=cfg.ignore_eos,
                                   extra_body=cfg.extra_body)
            if sem is not None:
                async with sem:
                    rec = await send_request(client, url, req, payload, check_length=cfg.ignore_eos, events=events,
                                             cached=times.cached)
            else:
                rec = await send_request(client, url, req, payload, check_length=cfg.ignore_eos, events=events,
                                         cached=times.cached)
            times.queue[req.request_id] = max(0.0, rec.arrival - (start + req.arrival / rate_scale))
            if on_done is not None:
                on_done(rec)
            return rec

        tasks = []
        if start is None:
            start = time.perf_counter()
        for req in wl.requests:
            due = start + req.arrival / rate_scale
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return records, duration, times


def _worker(cfg: BenchConfig, wl: Workload, rate_scale: float, start: float
            ) -> tuple[list[RequestRecord], ClientTimes]:
    records, _, times = run_loop(_run_async(cfg, wl, rate_scale, None, warmup=False, start=start))
    return records, times


def _ready() -> None:
    time.sleep(0.2)   # long enough that each process of the pool takes one


def _run_workers(cfg: BenchConfig, wl: Workload, rate_scale: float,
                 on_done: Callable[[RequestRecord], None] | None,
                 on_start: Callable[[], None] | None = None
                 ) -> tuple[list[RequestRecord], float, ClientTimes]:
    """The same schedule from ``cfg.workers`` client processes: request i goes to process
    i mod workers, each sends its share at the shared start + arrival, and the records
    come back in the original order."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if cfg.warmup:     # here, once: it checks the server before any process starts
        run_loop(_warmup_alone(cfg, wl))
    if on_start is not None:
        on_start()
    k = cfg.workers
    with ProcessPoolExecutor(k, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(_ready) for _ in range(k)]:
            f.result()     # every process is up (and has imported this module) before the clock starts
        start = time.perf_counter() + 0.2
        # each process gets its share of the requests, not the whole trace (pickled per task)
        futures = {pool.submit(_worker, cfg, replace(wl, requests=wl.requests[i::k], entries=[], texts=None), rate_scale,
                               start): i for i in range(k) if wl.requests[i::k]}
        parts: dict[int, list[RequestRecord]] = {}
        times = ClientTimes()
        for f in as_completed(futures):
            parts[futures[f]], part_times = f.result()
            times.update(part_times)
            if on_done is not None:
                for rec in parts[futures[f]]:
                    on_done(rec)
    duration = time.perf_counter() - start
    records: list[RequestRecord] = [None] * len(wl.requests)   # type: ignore[list-item]
    for i, part in parts.items():
        records[i::k] = part
    return records, duration, times


# Counters read from the server's /metrics, under any prefix (fairbatch:, or vllm: with
# `fairbatch serve --metrics-prefix vllm`, or vLLM's own server for preemptions).
RELEGATED_METRIC = "request_relegated_total"
PREEMPTIONS_METRIC = "num_preemptions_total"


def server_counters(cfg: BenchConfig) -> dict[str, float] | None:
    """The server's relegation and preemption counts (summed over labels), by the names
    above; a name it does not report is absent; None when /metrics cannot be read."""
    try:
        r = httpx.get(_url(cfg.base_url, "/metrics"), timeout=10.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        page = samples(r.text)
    except ValueError:
        return None
    out: dict[str, float] = {}
    for sample in page:
        _, colon, name = sample.name.rpartition(":")
        if colon and name in (RELEGATED_METRIC, PREEMPTIONS_METRIC):
            out[name] = out.get(name, 0.0) + sample.value
    return out


def server_relegated(cfg: BenchConfig) -> float | None:
    """The server's count of requests its scheduler relegated (late=relegate|reject); None
    when it does not report one (another server, a router)."""
    return (server_counters(cfg) or {}).get(RELEGATED_METRIC)


def run_once(cfg: BenchConfig, wl: Workload, rate_scale: float = 1.0,
             on_done: Callable[[RequestRecord], None] | None = None) -> RunOutcome:
    """Replay the workload once with arrivals compressed by ``rate_scale``.

    A client cannot see which requests the server relegated or preempted; when the
    server's ``/metrics`` has the counts, the summary's ``relegated`` and
    ``mean_preemptions`` come from their growth during the run (``server_relegated``
    says so: None when the server has no count; ``mean_preemptions`` is then None)."""
    before: list[dict[str, float] | None] = [None]

    def on_start() -> None:           # after the warm-up: its probe is not the run's
        before[0] = server_counters(cfg)

    if cfg.workers > 1:
        records, duration, times = _run_workers(cfg, wl, rate_scale, on_done, on_start)
    else:
        records, duration, times = run_loop(_run_async(cfg, wl, rate_scale, on_done, on_start=on_start))
    summary = summarize(records, duration=duration, percentiles=cfg.percentiles)
    # vLLM's ITL (per stream event) and peak concurrency (per second), not the simulator's
    summary |= itl_summary(records, times.events, cfg.percentiles)
    summary["max_concurrent_requests"] = max_concurrent_requests(records)
    summary = keep_percentile_metrics(summary, cfg.percentile_metrics)
    if not cfg.goodput:
        summary["request_goodput"] = None
    after = server_counters(cfg) if before[0] is not None else None
    b, a = before[0] or {}, after or {}
    summary["server_relegated"] = None
    if RELEGATED_METRIC in b and RELEGATED_METRIC in a:
        summary["server_relegated"] = summary["relegated"] = int(a[RELEGATED_METRIC] - b[RELEGATED_METRIC])
    summary["mean_preemptions"] = None
    if PREEMPTIONS_METRIC in b and PREEMPTIONS_METRIC in a and records:
        summary["mean_preemptions"] = (a[PREEMPTIONS_METRIC] - b[PREEMPTIONS_METRIC]) / len(records)
    # what was configured (vLLM prints that), scaled like the arrivals
    rate = cfg.request_rate * rate_scale if cfg.request_rate is not None else wl.base_rate * rate_scale
    summary["request_rate"] = rate if math.isfinite(rate) else "inf"
    summary["rate_scale"] = rate_scale
    reasons = Counter(r.error for r in records if not r.success)
    summary["failure_reasons"] = dict(reasons.most_common())
    summary |= prefix_summary(wl, records, times.cached)
    return RunOutcome(rate_scale, summary, records, times)


def prefix_summary(wl: Workload, records: list[RequestRecord], cached: dict[str, int]) -> dict[str, Any]:
    """What the workload shares and what the server says it reused:

    - ``shared_prompt_tokens`` / ``shared_prompt_ratio``: the prompt tokens an unbounded
      prefix cache of the server's KV blocks (16 tokens unless a fairbatch server says
      otherwise) would reuse over the workload (``prefix_prompts``), of all its prompt
      tokens;
    - ``cached_prompt_tokens`` / ``prefix_cache_hit_rate``: the server's
      ``cached_tokens`` summed over the requests that reported it, and their share of
      those requests' prompt tokens (None when no answer carried the field);
      ``cached_reported``: how many requests reported it."""
    total = sum(r.prompt_len for r in wl.requests)
    out: dict[str, Any] = {"shared_prompt_tokens": wl.shared_tokens,
                           "shared_prompt_ratio": wl.shared_tokens / total if total and wl.shared_tokens is not None
                           else None}
    reported = [r for r in records if r.request_id in cached]
    hit = sum(cached[r.request_id] for r in reported)
    asked = sum(r.prompt_len for r in reported)
    out["cached_reported"] = len(reported)
    out["cached_prompt_tokens"] = hit if reported else None
    out["prefix_cache_hit_rate"] = hit / asked if reported and asked else None
    return out


def result_json(cfg: BenchConfig, wl: Workload, outcome: RunOutcome, *, detailed: bool = False,
                runs: list[dict[str, Any]] | None = None, capacity: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM's result layout (metadata + summary) with our SLO keys and the simulator's
    ``scenario`` / ``runs`` / ``capacity`` keys."""
    label = cfg.label or (wl.server_info.get("fairbatch") or {}).get("policy") or "server"
    s = outcome.summary
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai",
        "backend": "openai",
        "label": label,
        "model_id": wl.model,
        "tokenizer_id": wl.model,
        "num_prompts": len(wl.requests),
        "request_rate": s.get("request_rate"),
        "burstiness": cfg.burstiness if cfg.request_rate is not None else None,
        "max_concurrency": cfg.max_concurrency,
    }
    out.update(s)
    out["policy"] = label
    out["trace"] = cfg.trace
    out["truncated_requests"] = wl.truncated
    scenario = {k: v for k, v in cfg.to_dict().items() if k not in ("extra_body",)}
    scenario["model"] = wl.model
    out["scenario"] = scenario
    out["runs"] = runs if runs is not None else [{"policy": label, **s}]
    if capacity is not None:   # {target: CapacityResult dict}, as `fairbatch simulate` writes it
        out["capacity"] = {label: {t: c["request_rate"] for t, c in capacity.items()}}
        out["capacity_search"] = {label: capacity}
    if detailed:
        recs = outcome.records
        out["input_lens"] = [r.prompt_len for r in recs]
        out["output_lens"] = [r.output_len for r in recs]
        out["ttfts"] = [r.ttft if r.ttft is not None else 0.0 for r in recs]
        out["itls"] = [r.itls.tolist() for r in recs]
        out["slo_classes"] = [r.slo_class for r in recs]
        out["start_times"] = [r.arrival for r in recs]
        out["errors"] = [r.error or "" for r in recs]
    # vLLM keeps these two lists even without --save-detailed: end-to-end latency (to the
    # last event) and client queue time
    recs = outcome.records
    out["latencies"] = [(r.finish_time - r.arrival) if r.finish_time is not None else 0.0 for r in recs]
    out["queue_times"] = [outcome.times.queue.get(r.request_id, 0.0) for r in recs]
    return out


def run_capacity(cfg: BenchConfig, wl: Workload, *, targets: tuple[float, ...] = (0.9, 0.99), lo: float = 1.0,
                 hi: float | None = None,
                 rel_tol: float = 0.05, max_iter: int = 8, max_expand: int = 4,
                 on_point: Callable[[float, float, dict[str, Any]], None] | None = None,
                 on_done: Callable[[RequestRecord], None] | None = None) -> tuple[Any, dict[float, RunOutcome]]:
    """Bisect the rate scale for the highest one with SLO attainment >= each target (runs
    shared between targets); returns {target: CapacityResult} and every run's outcome.

    Without ``hi`` the scale doubles (or, if ``lo`` fails, halves) at most ``max_expand``
    times: every halving doubles a run's wall time, so a real server's search is kept short."""
    if not math.isfinite(wl.base_rate):
        raise BenchError("--capacity needs finite arrival times (not --request-rate inf)")
    outcomes: dict[float, RunOutcome] = {}

    def run(scale: float) -> dict[str, Any]:
        # each point its own prompts: a server's prefix cache would otherwise serve a point
        # the previous point's prompts (the trace's sharing is kept within each point)
        o = run_once(cfg, with_salt(cfg, wl, point_salt(wl.salt, len(outcomes))), scale, on_done)
        outcomes[scale] = o
        return o.summary

    res = find_capacities(run, lo=lo, hi=hi, targets=targets, rel_tol=rel_tol, max_iter=max_iter, on_point=on_point,
                          max_expand=max_expand)
    return res, outcomes
