"""Prometheus metrics of one server, in its own ``CollectorRegistry``.

Names follow vLLM's (``vllm:num_requests_running`` -> ``fairbatch:num_requests_running``,
same suffixes, units and histogram buckets), so dashboards carry over by changing the
prefix. Ours on top: SLO attainment per SLO class (TTFT, vLLM-style mean TPOT, both, and
FairBatching's per-token envelope), the scheduler's admission budget, queued prefill
tokens, and its late-request counts (``request_rejected{reason="late"}`` for the 429s of
``late=reject``, ``request_relegated`` from the engine's snapshot). Request-level series
are observed by the engine thread as tokens are produced (prometheus-client is
thread-safe); gauges are read from the engine's snapshot at scrape time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from fairbatch.metrics.records import record_from_request
from fairbatch.request import Request

if TYPE_CHECKING:
    from fairbatch.server.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py), with a few sub-10 ms ones for small models.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
OBJECTIVES = ("ttft", "tpot", "both", "envelope")
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)       # vLLM's request_num_preemptions buckets
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)               # vLLM's request_params_n buckets


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit``: vLLM's token-count buckets (up to the
    context length)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


def valid_prefix(prefix: str) -> str:
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", prefix):
        raise ValueError(f"metrics prefix {prefix!r} is not a Prometheus name (letters, digits, _)")
    return prefix


class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = "fairbatch", max_model_len: int = 1 << 17) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.prefix = valid_prefix(prefix)
        self.model_name = model_name
        p = prefix + ":"
        lab = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests.", lab, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", lab, registry=r)
        self.request_success = Counter(p + "request_success", "Finished requests, by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.request_aborted = Counter(p + "request_aborted", "Requests aborted (client gone, stop string, error).",
                                       lab, registry=r)
        self.request_rejected = Counter(p + "request_rejected", "Requests refused, by reason: queue_full (503, "
                                        "--max-pending reached), late (429, the scheduler's late=reject: the "
                                        "request could not meet its TTFT).", lab + ["reason"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive output tokens.", lab,
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram(p + "request_time_per_output_token_seconds",
                              "Per request: (e2e - ttft) / (output tokens - 1), as vllm bench serve's TPOT.", lab,
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=E2E_BUCKETS, registry=r)
        # vLLM's per-request phases (vllm/v1/metrics/loggers.py): queued until first
        # scheduled, scheduled until the first token, first token until the last
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time from arrival to first scheduled.",
                                    lab, buckets=E2E_BUCKETS, registry=r)
        self.prefill_time = Histogram(p + "request_prefill_time_seconds", "Time from first scheduled to the first "
                                      "token.", lab, buckets=E2E_BUCKETS, registry=r)
        self.decode_time = Histogram(p + "request_decode_time_seconds", "Time from the first token to the last.",
                                     lab, buckets=E2E_BUCKETS, registry=r)
        self.inference_time = Histogram(p + "request_inference_time_seconds", "Time from first scheduled to the "
                                        "last token.", lab, buckets=E2E_BUCKETS, registry=r)
        tokens = buckets_1_2_5(max_model_len)
        self.req_prompt_tokens = Histogram(p + "request_prompt_tokens", "Prompt tokens of each finished request.",
                                           lab, buckets=tokens, registry=r)
        self.req_generation_tokens = Histogram(p + "request_generation_tokens", "Generated tokens of each finished "
                                               "request.", lab, buckets=tokens, registry=r)
        self.req_max_tokens = Histogram(p + "request_params_max_tokens", "max_tokens of each finished request.",
                                        lab, buckets=tokens, registry=r)
        self.req_params_n = Histogram(p + "request_params_n", "n of each finished request.", lab,
                                      buckets=PARAMS_N_BUCKETS, registry=r)
        self.req_max_generation = Histogram(p + "request_max_num_generation_tokens", "Longest output of the n "
                                            "samples of each finished request.", lab, buckets=tokens, registry=r)
        self.req_preemptions = Histogram(p + "request_num_preemptions", "Preemptions of each finished request.",
                                         lab, buckets=PREEMPTION_BUCKETS, registry=r)
        # the served stack's share of TTFT that the front end sees: IPC, fan-out, detokenizing
        self.delivery = Histogram(p + "first_token_delivery_seconds", "Time from the end of the engine step "
                                  "that made a first token to the front end handing it to the client's stream.",
                                  lab, buckets=ITL_BUCKETS, registry=r)
        self._scheduled: dict[str, float] = {}      # request id -> first scheduled, until it ends
        self.slo_requests = Counter(p + "slo_requests", "Requests counted for SLO attainment: finished, and "
                                    "refused for lateness (late=reject; each a miss).",
                                    lab + ["slo_class"], registry=r)
        self.slo_met = Counter(p + "slo_met", "Finished requests that met an objective "
                               "(ttft, tpot, both, envelope = every token by its deadline).",
                               lab + ["slo_class", "objective"], registry=r)
        self._lock = threading.Lock()
        self._attain: dict[str, list[int]] = {}      # class -> [requests, met both, met envelope]
        self.engine: AsyncEngine | None = None
        self.registry.register(_StateCollector(self))
        # label children resolved once: observe() is on the per-token path
        m = model_name
        self._prompt_tokens = self.prompt_tokens.labels(m)
        self._generation_tokens = self.generation_tokens.labels(m)
        self._ttft = self.ttft.labels(m)
        self._itl = self.itl.labels(m)
        self._tpot = self.tpot.labels(m)
        self._e2e = self.e2e.labels(m)
        self._delivery = self.delivery.labels(m)
        self._aborted = self.request_aborted.labels(m)
        self._rejected = self.request_rejected.labels(m, "queue_full")
        self._late_rejected = self.request_rejected.labels(m, "late")

    # --- events (event loop thread) --------------------------------------------------------
    def on_arrival(self, req: Request) -> None:
        self._prompt_tokens.inc(req.prompt_len)

    def on_tokens(self, req: Request, start: int, end: int) -> None:
        """Output tokens ``start..end-1`` of ``req`` were just produced."""
        times = req.token_times
        self._generation_tokens.inc(end - start)
        itl = self._itl
        for j in range(start, end):
            if j == 0:
                self._ttft.observe(times[0] - req.arrival)
            else:
                itl.observe(times[j] - times[j - 1])

    def on_first_token_delivered(self, delay: float) -> None:
        self._delivery.observe(delay)

    def on_scheduled(self, req: Request, when: float) -> None:
        """The engine scheduled ``req`` for the first time at ``when``."""
        self._scheduled[req.request_id] = when

    def on_finish(self, req: Request, reason: str | None = None) -> None:
        """``req`` finished (``reason``: when the front end ended it, on a stop string)."""
        m = self.model_name
        self.request_success.labels(m, reason or req.finish_reason or "length").inc()
        n = len(req.token_times)
        self._phases(req, req.first_token_time, req.token_times[-1] if n else None)
        # metrics.records' definitions, as the benchmark client's summary and the vLLM
        # plugin count; the request finished here, whatever state the engine has it in yet
        rec = replace(record_from_request(req), success=True, error=None)
        if rec.e2e is not None:
            self._e2e.observe(rec.e2e)
        if rec.tpot is not None:
            self._tpot.observe(rec.tpot)
        cls = req.slo.name
        ttft_ok, tpot_ok, env_ok = rec.meets_ttft, rec.meets_tpot, rec.meets_envelope
        self.slo_requests.labels(m, cls).inc()
        for name, ok in (("ttft", ttft_ok), ("tpot", tpot_ok), ("both", ttft_ok and tpot_ok), ("envelope", env_ok)):
            if ok:
                self.slo_met.labels(m, cls, name).inc()
        with self._lock:
            a = self._attain.setdefault(cls, [0, 0, 0])
            a[0] += 1
            a[1] += int(ttft_ok and tpot_ok)
            a[2] += int(env_ok)

    def on_request_done(self, n: int, output_tokens: list[int]) -> None:
        """Every choice of an HTTP request finished: its prompts' ``n`` samples each count
        as one vLLM request (n, its longest output)."""
        m = self.model_name
        for i in range(0, len(output_tokens), n):
            self.req_params_n.labels(m).observe(n)
            self.req_max_generation.labels(m).observe(max(output_tokens[i:i + n]))

    def _phases(self, req: Request, first: float | None, last: float | None) -> None:
        m = self.model_name
        scheduled = self._scheduled.pop(req.request_id, None)
        if scheduled is not None:
            self.queue_time.labels(m).observe(max(0.0, scheduled - req.arrival))
            if first is not None:
                self.prefill_time.labels(m).observe(max(0.0, first - scheduled))
            if last is not None:
                self.inference_time.labels(m).observe(max(0.0, last - scheduled))
        if first is not None and last is not None:
            self.decode_time.labels(m).observe(last - first)
        self.req_prompt_tokens.labels(m).observe(req.prompt_len)
        self.req_generation_tokens.labels(m).observe(len(req.token_times))
        self.req_max_tokens.labels(m).observe(req.max_new_tokens)
        self.req_preemptions.labels(m).observe(req.num_preemptions)

    def on_abort(self, req: Request) -> None:
        self._scheduled.pop(req.request_id, None)
        self._aborted.inc()

    def on_reject(self, n: int = 1) -> None:
        """``n`` requests refused because the server is full (503)."""
        self._rejected.inc(n)

    def on_late_reject(self, req: Request) -> None:
        """The scheduler refused ``req`` (late=reject, 429): it could not meet its TTFT. It
        counts for SLO attainment as a miss, as ``metrics.summarize`` counts it."""
        self._late_rejected.inc()
        self._scheduled.pop(req.request_id, None)
        cls = req.slo.name
        self.slo_requests.labels(self.model_name, cls).inc()
        with self._lock:
            self._attain.setdefault(cls, [0, 0, 0])[0] += 1

    # --- exposition ------------------------------------------------------------------------
    def attainment(self) -> dict[str, tuple[int, float, float]]:
        """slo_class -> (finished requests, SLO attainment, envelope attainment)."""
        with self._lock:
            return {k: (n, both / n if n else 0.0, env / n if n else 0.0) for k, (n, both, env) in self._attain.items()}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read at scrape time from the engine's latest snapshot."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Any]:
        return []   # dynamic: never registered by name, so no clash checks needed

    def collect(self) -> Iterator[Any]:
        m = self.m
        p = m.prefix + ":"
        eng = m.engine
        lab = ["model_name"]
        snap = eng.snapshot if eng is not None else None

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(p + name, doc, labels=lab)
            g.add_metric([m.model_name], value)
            return g

        if snap is not None:
            yield gauge("num_requests_running", "Requests holding KV blocks (admitted).", snap.running)
            yield gauge("num_requests_waiting", "Requests queued for admission (incl. preempted).", snap.waiting)
            yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", snap.kv_usage)
            yield gauge("gpu_cache_usage_perc", "Same as kv_cache_usage_perc (vLLM V0 name).", snap.kv_usage)
            yield gauge("num_kv_blocks_free", "Free KV-cache blocks.", snap.free_blocks)
            yield gauge("admission_budget_tokens", "Prompt tokens the instance can still start within TTFT "
                        "(the scheduler's load estimate for routers).", snap.admission_budget)
            yield gauge("queued_prefill_tokens", "Prompt tokens not yet computed.", snap.queued_prefill_tokens)
            if snap.iteration_tokens:
                yield _iteration_tokens(p, m.model_name, snap)
            c = CounterMetricFamily(p + "num_preemptions", "Recompute preemptions.", labels=lab)
            c.add_metric([m.model_name], snap.preemptions)
            yield c
            c = CounterMetricFamily(p + "request_relegated", "Requests the scheduler put behind the ones that "
                                    "can still meet their SLO (late=relegate|reject): a prompt past its TTFT, or "
                                    "a request whose first token came late.", labels=lab)
            c.add_metric([m.model_name], snap.relegated)
            yield c
            c = CounterMetricFamily(p + "engine_steps", "Engine steps run.", labels=lab)
            c.add_metric([m.model_name], snap.steps)
            yield c
            for name, doc, value in (
                    ("engine_step_seconds", "Measured execution time of the engine's steps.", snap.step_seconds),
                    ("engine_step_predicted_seconds", "The scheduler's latency model's prediction for the same "
                     "steps (divide the two for the model's error on this host).", snap.step_predicted_seconds),
                    ("engine_busy_seconds", "Wall time from each step's start to the next step's start "
                     "(scheduling, output hand-off and new requests included).", snap.busy_seconds),
                    ("engine_step_tokens", "Tokens computed by engine steps (prefill and decode).", snap.step_tokens),
                    ("latency_model_refits", "Accepted online refits of the step-time model (--refit-latency).",
                     snap.latency_refits),
                    ("latency_model_refit_attempts", "Refit windows the online step-time model looked at; a "
                     "window that fits badly (noisy steps) is not accepted.", snap.latency_refit_attempts),
                    # vLLM's prefix-cache counters, in tokens (hit rate = hits / queries); both stay
                    # at 0 with --no-enable-prefix-caching, as vLLM's do
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (at the first "
                     "admission of each request that may use it).", snap.prefix_cache_queries),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV reused, not "
                     "computed).", snap.prefix_cache_hits)):
                c = CounterMetricFamily(p + name, doc, labels=lab)
                c.add_metric([m.model_name], value)
                yield c
        if eng is not None:
            yield _cache_config_info(p, eng.model)
            yield gauge("num_requests_in_server", "Requests accepted and not finished (running, waiting, "
                        "or on their way to the engine).", eng.num_active)
            c = CounterMetricFamily(p + "engine_step_errors", "Engine steps that raised.", labels=lab)
            c.add_metric([m.model_name], eng.step_errors)
            yield c
        att = m.attainment()
        g = GaugeMetricFamily(p + "slo_attainment", "Fraction of finished requests that met both TTFT and TPOT "
                              "objectives, by SLO class (requests refused for lateness count as misses).",
                              labels=lab + ["slo_class"])
        e = GaugeMetricFamily(p + "envelope_attainment", "Fraction of finished requests whose every token met "
                              "its per-token deadline, by SLO class.", labels=lab + ["slo_class"])
        for cls, (_, slo, env) in sorted(att.items()):
            g.add_metric([m.model_name, cls], slo)
            e.add_metric([m.model_name, cls], env)
        yield g
        yield e


def _iteration_tokens(p: str, model_name: str, snap: Any) -> HistogramMetricFamily:
    """vLLM's iteration_tokens_total: engine steps by tokens computed, from the engine's
    per-bucket counts."""
    from fairbatch.server.engine_loop import ITERATION_TOKENS_BUCKETS

    h = HistogramMetricFamily(p + "iteration_tokens_total", "Tokens computed per engine step.",
                              labels=["model_name"])
    cum = 0
    buckets = []
    for le, count in zip([*map(float, ITERATION_TOKENS_BUCKETS), float("inf")], snap.iteration_tokens):
        cum += count
        buckets.append(("+Inf" if le == float("inf") else repr(le), cum))
    h.add_metric([model_name], buckets, sum_value=snap.step_tokens)
    return h


def _cache_config_info(p: str, model: Any) -> GaugeMetricFamily:
    """vLLM's cache_config_info: the KV cache's configuration as labels of a gauge at 1
    (dashboards read num_gpu_blocks and block_size from it)."""
    info = getattr(model, "info", None)
    labels = {"block_size": str(getattr(info, "block_size", "")), "num_gpu_blocks": str(model.num_blocks),
              "num_cpu_blocks": "0", "cache_dtype": "auto",
              "enable_prefix_caching": str(bool(getattr(info, "prefix_caching", False))),
              "engine": "0"}
    g = GaugeMetricFamily(p + "cache_config_info", "Information of the engine's KV cache configuration.",
                          labels=list(labels))
    g.add_metric(list(labels.values()), 1.0)
    return g
