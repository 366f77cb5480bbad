"""The HTTP router: an OpenAI-compatible proxy in front of several backends.

``build_router_app(backends, router)`` is a FastAPI app that

- polls every backend's ``GET /load`` (each on its own task, every ``poll_interval``
  seconds) and routes each ``POST /v1/completions`` / ``/v1/chat/completions`` with a
  routing policy of ``fairbatch.cluster.routing`` over the backends' loads, plus the
  router's own count of what it sent since each poll (``Router.observe``);
- marks a backend unhealthy after ``failures_to_mark_down`` consecutive failed polls
  (timeout, bad answer; default 3), or at once when a connection to it is refused or
  reset (its process is gone), and sends it nothing until a poll succeeds again. One slow
  poll is not a dead backend: a backend busy parsing a large body misses a poll and is
  still the one to answer that body;
- streams answers through (SSE), and retries on another backend a request that has not
  started: nothing was sent to the client yet — no response headers for a non-streaming
  request, no event carrying output (a chat stream's leading role-only event is held back
  until then) for a streaming one. Causes: a transport error, a 5xx answer, an error
  event before any output, or the backend being marked unhealthy while the request waited
  for its first token. Each backend is tried at most once per request.
- treats a 429 (a backend whose scheduler refused the request: ``late=reject``, it could
  not meet its TTFT there) the same way: the request goes to the next backend the policy
  picks among those not tried, and the backend stays healthy. When every backend refused
  it, the router answers 429 itself (``Retry-After``, the reason in
  ``x-llm-d-request-dropped-reason``). Other 4xx answers are the client's: passed
  through, never retried: a bad request is bad on every backend.
- ends a stream that had started and then lost its backend with an OpenAI-format
  ``error`` event naming the backend and the cause (and no ``[DONE]``): the output cannot
  be resumed elsewhere, so the client is told clearly;
- answers ``GET /health`` (200 while a backend is healthy), ``GET /v1/models`` (a healthy
  backend's), ``GET /load`` (the cluster's aggregate load, so routers can be stacked),
  ``GET /backends`` (each backend's state; the launcher's pids, nodes and log paths only
  with ``show_backend_details``) and ``GET /metrics`` (Prometheus, its own
  ``fairbatch_router:`` series);
- with ``api_key``, requires ``Authorization: Bearer KEY`` on ``/v1/*`` (and on
  ``/metrics``, ``/load``, ``/backends`` with ``protect_admin``), polls backends with
  ``backend_api_key``; bound to loopback, answers only loopback ``Host`` headers
  (``server/access.py``). It starts answering only once every backend was polled once, so
  no worker of several sharing a port routes on an empty view.

A backend without ``/load`` (vLLM, SGLang) is polled on ``/health`` instead, and routed
by the router's own in-flight counts. Everything lives in the app: no global state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fairbatch.cluster.router_workers import MULTIPROC_ENV
from fairbatch.cluster.backend_load import empty_load, load_from_json
from fairbatch.routing import Router, make_router
from fairbatch.scheduler.base import Load
from fairbatch.server.access import AccessControl, protected_paths
from fairbatch.server.body_limit import DEFAULT_BODY_TIMEOUT, BodyLimit, body_limit
from fairbatch.server.body_precheck import LargeBodyCheck, max_json_values
from fairbatch.server.errors import DROPPED_REASON_HEADER
from fairbatch.server.openapi import document_errors

log = logging.getLogger("fairbatch.router")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHARS_PER_TOKEN = 4.0          # prompt-length estimate for text prompts (no tokenizer here)
_FORWARD_REQUEST_HEADERS = ("content-type", "authorization", "accept", "x-request-id", "openai-organization",
                            "openai-project", "user-agent")
_FORWARD_RESPONSE_HEADERS = ("content-type", "cache-control", "x-accel-buffering", "retry-after", "x-request-id",
                             DROPPED_REASON_HEADER)
_ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLargeError", 429: "RateLimitError",
          499: "ClientClosedRequest", 502: "BadGatewayError", 503: "ServiceUnavailableError"}
ALL_REFUSED_REASON = "rejected-saturated"   # llm-d's word, for 429s that gave no reason of their own


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": None, "code": status}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message), status_code=status, headers=headers)


# --- prompt length -----------------------------------------------------------------------------
def _text_tokens(s: str) -> int:
    return max(1, math.ceil(len(s.encode("utf-8", "replace")) / CHARS_PER_TOKEN)) if s else 0


def estimate_prompt_tokens(path: str, body: Mapping[str, Any]) -> int:
    """Prompt tokens a request will ask the backend to prefill: exact for token-id prompts,
    ``bytes / 4`` for text (the router has no tokenizer), times ``n``. Never raises: a body
    the backend will refuse gets some estimate and the backend's own 400."""
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    total = 0
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        for m in msgs if isinstance(msgs, list) else ():
            if not isinstance(m, dict):
                continue
            total += 4                                    # role and template tokens
            c = m.get("content")
            if isinstance(c, str):
                total += _text_tokens(c)
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += _text_tokens(part["text"])
    else:
        p = body.get("prompt")
        if isinstance(p, str):
            total = _text_tokens(p)
        elif isinstance(p, list) and p:
            if all(isinstance(t, int) for t in p):
                total = len(p)
            else:
                for q in p:
                    if isinstance(q, str):
                        total += _text_tokens(q)
                    elif isinstance(q, list):
                        total += len(q)
    return max(1, total) * n


# --- SSE: has a stream started? ------------------------------------------------------------------
def _event_kind(event: bytes) -> str:
    """``"output"`` (carries generated text, a finish, usage or [DONE]), ``"error"``, or
    ``"none"`` (a role-only chat delta, a comment, a keep-alive)."""
    kind = "none"
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return "output"
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return "output"                       # not ours to judge: pass it on
        if not isinstance(obj, dict):
            return "output"
        if obj.get("error") is not None:
            return "error"
        if obj.get("usage") and not obj.get("choices"):
            return "output"
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                return "output"
            if ch.get("finish_reason") is not None or ch.get("text"):
                return "output"
            delta = ch.get("delta")
            if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")
                                            or delta.get("reasoning_content")):
                return "output"
            if "text" in ch and not isinstance(ch.get("text"), str):
                return "output"
    return kind


# --- backends --------------------------------------------------------------------------------------
@dataclass
class Backend:
    index: int
    url: str
    healthy: bool = False
    has_load: bool | None = None          # None: not known yet; False: no /load (polled on /health)
    load: Load | None = None
    load_wall: float = 0.0                # time.time() of the last good poll
    error: str | None = "not polled yet"
    inflight: int = 0                     # requests the router has open on it
    inflight_unstarted: int = 0           # ... of which no output has been streamed yet
    inflight_tokens: int = 0              # prompt tokens of the unstarted ones
    consecutive_failures: int = 0
    down: asyncio.Event = field(default_factory=asyncio.Event)   # set when it goes unhealthy
    meta: dict[str, Any] = field(default_factory=dict)           # e.g. the launcher's pid / node

    def info(self, now_wall: float, details: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "healthy": self.healthy, "error": self.error,
                               "inflight": self.inflight, "has_load": self.has_load}
        if details:
            out.update(self.meta)
        if self.load is not None:
            ld = self.load
            out["load"] = {"running": ld.running, "waiting": ld.waiting, "kv_usage": ld.kv_usage,
                           "free_blocks": ld.free_blocks, "num_blocks": ld.num_blocks,
                           "queued_prefill_tokens": ld.queued_prefill_tokens,
                           "admission_budget": ld.admission_budget if math.isfinite(ld.admission_budget) else None}
            out["load_age_s"] = now_wall - self.load_wall
        return out


class _Retry(Exception):
    """The request did not start on this backend; try another."""

    def __init__(self, reason: str, detail: str, response: Response | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.response = response          # what to answer if no backend is left

    @property
    def refused(self) -> bool:
        """The backend refused the request (429): it could not take it in time."""
        return self.reason == "rejected"


class _ClientGone(Exception):
    pass


class RouterMetrics:
    def __init__(self, state: "RouterState", prefix: str = "fairbatch_router") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p = prefix + ":"
        r = self.registry
        self.prefix = prefix
        self.requests = Counter(p + "requests", "Requests answered, by the backend that answered (or none) and "
                                "HTTP status.", ["backend", "status"], registry=r)
        self.retries = Counter(p + "retries", "Requests moved off a backend before they started, by cause.",
                               ["backend", "reason"], registry=r)
        self.midstream_failures = Counter(p + "midstream_failures", "Streams cut after they had started (the "
                                          "client got an error event).", ["backend"], registry=r)
        self.poll_failures = Counter(p + "poll_failures", "Failed load polls.", ["backend"], registry=r)
        self.marked_unhealthy = Counter(p + "backend_marked_unhealthy", "Times a backend was marked unhealthy.",
                                        ["backend"], registry=r)
        self.routing_seconds = Histogram(p + "routing_decision_seconds", "Time to choose a backend.",
                                         buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2), registry=r)
        self.first_output_seconds = Histogram(
            p + "time_to_first_output_seconds", "From the request's arrival to its first output forwarded "
            "(streaming) or its whole answer (non-streaming), retries included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0), registry=r)
        self._backends = _BackendCollector(state, p)
        self.registry.register(self._backends)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            # several router workers (router_workers.py): counters and histograms summed
            # over all of them from their shared files, the backend gauges from this one
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self._backends)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _BackendCollector(Collector):
    def __init__(self, state: "RouterState", p: str) -> None:
        self.state = state
        self.p = p

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        p = self.p
        now = time.time()
        fams = {
            "healthy": GaugeMetricFamily(p + "backend_healthy", "1 if the backend gets requests.", labels=["backend"]),
            "inflight": GaugeMetricFamily(p + "backend_inflight", "Requests open on the backend through this router.",
                                          labels=["backend"]),
            "sent": GaugeMetricFamily(p + "backend_sent_since_poll", "Requests sent after the load the router "
                                      "holds was measured.", labels=["backend"]),
            "age": GaugeMetricFamily(p + "backend_load_age_seconds", "Age of the load the router holds.",
                                     labels=["backend"]),
            "budget": GaugeMetricFamily(p + "backend_admission_budget_tokens", "Backend's admission budget at "
                                        "its last poll.", labels=["backend"]),
            "requests": GaugeMetricFamily(p + "backend_num_requests", "Running + waiting at the last poll.",
                                          labels=["backend"]),
        }
        router = self.state.router
        for b in self.state.backends:
            fams["healthy"].add_metric([b.url], 1.0 if b.healthy else 0.0)
            fams["inflight"].add_metric([b.url], b.inflight)
            if router.count_sent and b.index < len(router.sent_reqs):
                fams["sent"].add_metric([b.url], router.sent_reqs[b.index])
            if b.load is not None:
                fams["age"].add_metric([b.url], now - b.load_wall)
                if math.isfinite(b.load.admission_budget):
                    fams["budget"].add_metric([b.url], b.load.admission_budget)
                fams["requests"].add_metric([b.url], b.load.num_requests)
        yield from fams.values()


@dataclass
class RouterConfig:
    poll_interval: float = 0.05           # seconds between a backend's load polls
    poll_timeout: float = 2.0             # a poll slower than this fails the backend
    connect_timeout: float = 5.0          # connecting to a backend for a request
    down_poll_interval: float = 0.5       # polls of an unhealthy backend
    failures_to_mark_down: int = 3        # consecutive failed polls that mark a backend unhealthy
    request_timeout: float | None = None  # whole request (None: none; health is the polls' job)
    max_body_bytes: int = body_limit(1 << 17)   # larger bodies: 413 (a server's limit at a 128k context)
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT   # a body slower than this: 408
    api_key: str | None = None            # clients must send it (Bearer) on /v1/*
    protect_admin: bool = False           # ... and on /metrics, /load, /backends
    backend_api_key: str | None = None    # sent on the router's own polls of the backends
    show_backend_details: bool = False    # /backends lists the launcher's pids, nodes, log paths
    loopback_only: bool = False           # bound to loopback: only loopback Host headers
    startup_wait: float | None = None     # wait this long for every backend's first poll (None: 2 x poll timeout + 1 s)

    def __post_init__(self) -> None:
        if self.failures_to_mark_down < 1:
            raise ValueError("--failures-to-mark-down must be >= 1")


class RouterState:
    def __init__(self, urls: Sequence[str], router: Router, config: RouterConfig,
                 meta: Sequence[Mapping[str, Any]] | None = None) -> None:
        if not urls:
            raise ValueError("need at least one backend")
        self.backends = [Backend(i, u.rstrip("/")) for i, u in enumerate(urls)]
        if meta:
            for b, m in zip(self.backends, meta):
                b.meta.update(m)
        self.router = router
        self.config = config
        self.loads: list[Load] = [empty_load() for _ in urls]
        self.metrics = RouterMetrics(self)
        self.client: httpx.AsyncClient | None = None
        self.poll_client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.first_poll_done = asyncio.Event()
        self._polled = 0

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.request_timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024))
        auth = {"Authorization": f"Bearer {cfg.backend_api_key}"} if cfg.backend_api_key else None
        self.poll_client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.poll_timeout), headers=auth,
                                             limits=httpx.Limits(max_connections=4 * len(self.backends) + 4))
        self.first_poll_done = asyncio.Event()
        self._polled = 0
        for b in self.backends:
            b.down = asyncio.Event()
            b.down.set()                   # unhealthy until its first good poll
            self._tasks.append(asyncio.create_task(self._poll_loop(b), name=f"poll-{b.url}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):   # noqa: BLE001
                pass
        self._tasks.clear()
        for c in (self.client, self.poll_client):
            if c is not None:
                await c.aclose()

    # --- health ----------------------------------------------------------------------------------
    def mark_up(self, b: Backend) -> None:
        b.consecutive_failures = 0
        b.error = None
        if not b.healthy:
            b.healthy = True
            b.down = asyncio.Event()
            log.info("backend %s is healthy", b.url)

    def mark_down(self, b: Backend, why: str) -> None:
        b.error = why
        if b.healthy:
            b.healthy = False
            b.down.set()
            self.metrics.marked_unhealthy.labels(b.url).inc()
            log.warning("backend %s marked unhealthy: %s", b.url, why)

    def request_failed(self, b: Backend, why: str, e: BaseException) -> None:
        """A request to ``b`` failed in transport. Refused or reset: its process is gone,
        down at once. A timeout: a busy backend, counted like a failed poll."""
        if isinstance(e, httpx.TimeoutException):
            b.consecutive_failures += 1
            if b.consecutive_failures >= self.config.failures_to_mark_down:
                self.mark_down(b, why)
        else:
            self.mark_down(b, why)

    async def wait_first_polls(self) -> None:
        """Until every backend was polled once (bounded): a router that answers before that
        sends everything to whichever backend it heard from first, or answers 503."""
        cfg = self.config
        wait = cfg.startup_wait if cfg.startup_wait is not None else 2 * cfg.poll_timeout + 1.0
        try:
            await asyncio.wait_for(self.first_poll_done.wait(), wait)
        except asyncio.TimeoutError:
            log.warning("not every backend answered its first poll within %.3g s; serving anyway", wait)

    def _failed_poll(self, b: Backend, why: str) -> None:
        self.metrics.poll_failures.labels(b.url).inc()
        b.consecutive_failures += 1
        if b.consecutive_failures >= self.config.failures_to_mark_down or not b.healthy:
            self.mark_down(b, why)
        else:
            b.error = why

    async def poll_once(self, b: Backend) -> None:
        assert self.poll_client is not None
        since = self.router.num_sent
        try:
            if b.has_load is False:
                r = await self.poll_client.get(b.url + "/health")
                if r.status_code != 200:
                    raise _PollError(f"/health answered HTTP {r.status_code}")
                self._set_load(b, self._inflight_load(b), self.router.num_sent)
            else:
                r = await self.poll_client.get(b.url + "/load")
                if r.status_code == 404 and b.has_load is None:
                    b.has_load = False
                    await self.poll_once(b)
                    return
                if r.status_code != 200:
                    raise _PollError(f"/load answered HTTP {r.status_code}")
                try:
                    ld = load_from_json(r.json(), time=time.monotonic())
                except ValueError as e:
                    raise _PollError(f"bad /load answer: {e}") from None
                b.has_load = True
                self._set_load(b, ld, since)
            self.mark_up(b)
        except httpx.TimeoutException:
            self._failed_poll(b, f"load poll timed out after {self.config.poll_timeout:g} s")
        except httpx.HTTPError as e:
            self._failed_poll(b, f"load poll failed: {_describe(e)}")
        except _PollError as e:
            self._failed_poll(b, str(e))

    def _set_load(self, b: Backend, ld: Load, since: int) -> None:
        b.load = ld
        b.load_wall = time.time()
        self.loads[b.index] = ld
        self.router.observe(b.index, ld, since)

    def _inflight_load(self, b: Backend) -> Load:
        """For a backend without /load: what the router itself has open there."""
        return Load(running=b.inflight - b.inflight_unstarted, waiting=b.inflight_unstarted, kv_usage=0.0,
                    free_blocks=0, num_blocks=0, queued_prefill_tokens=b.inflight_tokens,
                    admission_budget=float(-b.inflight_tokens), time=time.monotonic())

    async def _poll_loop(self, b: Backend) -> None:
        loop = asyncio.get_running_loop()
        first = True
        while True:
            t0 = loop.time()
            try:
                await self.poll_once(b)
            except Exception as e:   # noqa: BLE001 - a poller must never die
                log.exception("load poll of %s raised", b.url)
                self._failed_poll(b, f"load poll raised {type(e).__name__}")
            if first:
                first = False
                self._polled += 1
                if self._polled >= len(self.backends):
                    self.first_poll_done.set()
            interval = self.config.poll_interval if b.healthy else self.config.down_poll_interval
            await asyncio.sleep(max(0.0, t0 + interval - loop.time()))

    # --- routing -------------------------------------------------------------------------------------
    def choose(self, prompt_len: int, exclude: set[int]) -> Backend | None:
        cand = [b.index for b in self.backends if b.healthy and b.index not in exclude]
        if not cand:
            return None
        t0 = time.perf_counter()
        k = self.router.choose(prompt_len, self.loads, cand)
        self.metrics.routing_seconds.observe(time.perf_counter() - t0)
        return self.backends[k]

    def aggregate_load(self) -> dict[str, Any]:
        live = [b.load for b in self.backends if b.healthy and b.load is not None and b.has_load]
        num_blocks = sum(ld.num_blocks for ld in live)
        free = sum(ld.free_blocks for ld in live)
        budget = sum(max(0.0, ld.admission_budget) for ld in live if math.isfinite(ld.admission_budget))
        return {"running": sum(ld.running for ld in live), "waiting": sum(ld.waiting for ld in live),
                "kv_usage": 1.0 - free / num_blocks if num_blocks else 0.0, "free_blocks": free,
                "num_blocks": num_blocks, "queued_prefill_tokens": sum(ld.queued_prefill_tokens for ld in live),
                "admission_budget": budget, "time": time.monotonic(),
                "num_requests": sum(ld.num_requests for ld in live),
                "healthy_backends": sum(b.healthy for b in self.backends), "backends": len(self.backends),
                "router": self.router.name}


class _PollError(Exception):
    pass


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- the app -----------------------------------------------------------------------------------------
def build_router_app(backends: Sequence[str], router: str | Router = "admission", *,
                     config: RouterConfig | None = None,
                     backend_meta: Sequence[Mapping[str, Any]] | None = None) -> FastAPI:
    """The router app over ``backends`` (base URLs). ``router``: a policy spec
    (``NAME[:KEY=VALUE,...]``, see ``routing.make_router``) or a Router."""
    r = make_router(router) if isinstance(router, str) else router
    state = RouterState(backends, r, config or RouterConfig(), backend_meta)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        await state.wait_first_polls()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="fairbatch router", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible router over fairbatch (or any OpenAI-compatible) servers.")
    app.state.router = state
    cfg = state.config
    app.add_middleware(LargeBodyCheck, max_values=max_json_values(1 << 17))   # the router parses bodies too
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout=cfg.body_timeout)
    app.add_middleware(AccessControl, api_key=cfg.api_key, protected=protected_paths(cfg.protect_admin),
                       loopback_only=cfg.loopback_only)
    document_errors(app, per_path={"/health": (503,), "/v1/models": (401, 421, 503)})

    @app.get("/health")
    async def health() -> Response:
        n = sum(b.healthy for b in state.backends)
        if n == 0:
            return _error(503, "no healthy backend: " + "; ".join(f"{b.url}: {b.error}" for b in state.backends))
        return JSONResponse({"status": "ok", "healthy_backends": n, "backends": len(state.backends)})

    @app.get("/backends")
    async def backends_info() -> JSONResponse:
        now = time.time()
        return JSONResponse({"router": state.router.name, "count_sent": state.router.count_sent,
                             "backends": [b.info(now, cfg.show_backend_details) for b in state.backends]})

    @app.get("/load")
    async def load() -> JSONResponse:
        return JSONResponse(state.aggregate_load())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        assert state.client is not None
        errors = []
        auth = {k: v for k, v in _backend_headers(state.config, request).items() if k.lower() == "authorization"}
        for b in state.backends:
            if not b.healthy:
                continue
            try:
                r = await state.client.get(b.url + "/v1/models", timeout=state.config.poll_timeout * 5, headers=auth)
            except httpx.HTTPError as e:
                errors.append(f"{b.url}: {_describe(e)}")
                continue
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        return _error(503, "no healthy backend" + (": " + "; ".join(errors) if errors else ""), {"Retry-After": "1"})

    async def route(request: Request) -> Response:
        return await _proxy(state, request)

    for path in _ROUTED_PATHS:
        app.add_api_route(path, route, methods=["POST"], include_in_schema=True)
    return app


def _backend_headers(cfg: RouterConfig, request: Request) -> dict[str, str]:
    """The client's headers worth forwarding; with ``backend_api_key`` the router speaks to
    the backends with its own key (the client's, checked here, may not be theirs)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_REQUEST_HEADERS}
    if cfg.backend_api_key:
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["authorization"] = f"Bearer {cfg.backend_api_key}"
    return headers


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _race(aw: Any, b: Backend, gone: asyncio.Future[Any]) -> Any:
    """Await ``aw``, unless the backend goes unhealthy (``_Retry``) or the client goes away
    (``_ClientGone``) first; the loser is cancelled."""
    task = asyncio.ensure_future(aw)
    down = asyncio.ensure_future(b.down.wait())
    try:
        done, _ = await asyncio.wait({task, down, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        down.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):   # noqa: BLE001
        pass
    if gone in done:
        raise _ClientGone()
    raise _Retry("unhealthy", f"{b.url} was marked unhealthy while the request waited ({b.error})")


async def _proxy(state: RouterState, request: Request) -> Response:
    arrival = time.perf_counter()
    path = request.url.path
    limit = state.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, f"request body larger than {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        return _error(413, f"request body larger than {limit} bytes")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return _error(400, f"request body is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return _error(400, "request body must be a JSON object")
    stream = obj.get("stream") is True
    prompt_len = estimate_prompt_tokens(path, obj)
    headers = _backend_headers(state.config, request)
    headers.setdefault("content-type", "application/json")
    query = request.url.query
    gone = asyncio.ensure_future(_wait_disconnect(request))
    tried: set[int] = set()
    reasons: list[str] = []
    last: _Retry | None = None
    refusals: list[_Retry] = []
    try:
        while True:
            b = state.choose(prompt_len, tried)
            if b is None:
                break
            tried.add(b.index)
            url = b.url + path + (f"?{query}" if query else "")
            b.inflight += 1
            b.inflight_unstarted += 1
            b.inflight_tokens += prompt_len
            handed_over = False
            try:
                resp = await _attempt(state, b, url, body, headers, stream, gone, prompt_len)
                handed_over = isinstance(resp, _Stream)
                state.metrics.first_output_seconds.observe(time.perf_counter() - arrival)
                if not handed_over:
                    state.metrics.requests.labels(b.url, str(resp.status_code)).inc()
                return resp
            except _Retry as e:
                state.metrics.retries.labels(b.url, e.reason).inc()
                reasons.append(f"{b.url}: {e.detail}")
                last = e
                if e.refused:
                    refusals.append(e)     # routine under overload: no log line for each
                log.log(logging.DEBUG if e.refused else logging.INFO, "request moved off %s: %s", b.url, e.detail)
            finally:
                if not handed_over:
                    b.inflight -= 1
                    b.inflight_unstarted -= 1
                    b.inflight_tokens -= prompt_len
    except _ClientGone:
        state.metrics.requests.labels("none", "499").inc()
        return _error(499, "client disconnected")
    finally:
        if not gone.done():
            gone.cancel()
    if refusals and len(refusals) == len(tried):
        state.metrics.requests.labels("none", "429").inc()
        return _all_refused(refusals, reasons)
    if last is not None and last.response is not None:
        state.metrics.requests.labels("none", str(last.response.status_code)).inc()
        return last.response
    state.metrics.requests.labels("none", "503").inc()
    if not reasons:
        down = "; ".join(f"{b.url}: {b.error}" for b in state.backends)
        return _error(503, f"no healthy backend ({down})", {"Retry-After": "1"})
    return _error(503, "no backend could take the request: " + "; ".join(reasons), {"Retry-After": "1"})


def _all_refused(refusals: Sequence[_Retry], reasons: Sequence[str]) -> JSONResponse:
    """The router's own 429 once every backend refused the request: the shortest
    ``Retry-After`` any of them asked for, and the reason they gave."""
    waits: list[int] = []
    why = ""
    for r in refusals:
        h = r.response.headers if r.response is not None else {}
        ra = h.get("retry-after", "")
        if ra.isdigit():
            waits.append(int(ra))
        why = h.get(DROPPED_REASON_HEADER) or why
    why = why or ALL_REFUSED_REASON
    return _error(429, f"every backend refused the request ({why}): " + "; ".join(reasons),
                  {"Retry-After": str(min(waits) if waits else 1), DROPPED_REASON_HEADER: why})


async def _attempt(state: RouterState, b: Backend, url: str, body: bytes, headers: dict[str, str], stream: bool,
                   gone: asyncio.Future[Any], prompt_len: int) -> Response:
    """One try on backend ``b``: a Response to return, or ``_Retry``."""
    client = state.client
    assert client is not None
    req = client.build_request("POST", url, content=body, headers=headers)
    try:
        resp: httpx.Response = await _race(client.send(req, stream=True), b, gone)
    except (httpx.TimeoutException, httpx.TransportError) as e:
        state.request_failed(b, f"request failed: {_describe(e)}", e)
        raise _Retry("transport", _describe(e)) from None
    ok = False
    try:
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE_HEADERS}
        out_headers["x-fairbatch-backend"] = b.url
        if resp.status_code != 200:
            content = await _race(resp.aread(), b, gone)
            answer = Response(content, status_code=resp.status_code, headers=out_headers)
            if resp.status_code == 429:   # refused (late=reject): another backend may still make it in time
                raise _Retry("rejected", f"HTTP 429: {_short(content)}", answer)
            if resp.status_code == 503:
                raise _Retry("busy", f"HTTP 503: {_short(content)}", answer)
            if resp.status_code >= 500:
                raise _Retry("server_error", f"HTTP {resp.status_code}: {_short(content)}", answer)
            return answer                 # other 4xx: the client's to see
        if not stream or not resp.headers.get("content-type", "").startswith("text/event-stream"):
            content = await _race(resp.aread(), b, gone)
            return Response(content, status_code=200, headers=out_headers)
        chunks = resp.aiter_raw()
        buf = b""
        while True:
            buf += await _race(chunks.__anext__(), b, gone)
            kind, event = _first_event_with_output(buf)
            if kind == "error":
                raise _Retry("stream_error", f"error before any output: {_short(event)}")
            if kind == "output":
                break
        ok = True
        cut = _last_boundary(buf)
        return _Stream(state, b, resp, chunks, buf[:cut], buf[cut:], out_headers, prompt_len)
    except StopAsyncIteration:
        raise _Retry("stream_error", "the stream ended before any output") from None
    except (httpx.TimeoutException, httpx.TransportError) as e:
        state.request_failed(b, f"request failed: {_describe(e)}", e)
        raise _Retry("transport", _describe(e)) from None
    finally:
        if not ok:
            await resp.aclose()


def _short(content: bytes, n: int = 200) -> str:
    try:
        obj = json.loads(content.split(b"data:", 1)[-1] if content.startswith(b"data:") else content)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return str(obj["error"].get("message"))[:n]
    except (ValueError, UnicodeDecodeError):
        pass
    return content.decode("utf-8", "replace").strip()[:n]


_BOUNDARY = re.compile(rb"\r?\n\r?\n")


def _last_boundary(buf: bytes) -> int:
    """Index just past the last complete SSE event in ``buf`` (0 if none)."""
    end = 0
    for m in _BOUNDARY.finditer(buf):
        end = m.end()
    return end


def _first_event_with_output(buf: bytes) -> tuple[str, bytes]:
    """The kind of the first complete event in ``buf`` that is not ``"none"``."""
    pos = 0
    for m in _BOUNDARY.finditer(buf):
        event = buf[pos:m.start()]
        pos = m.end()
        kind = _event_kind(event)
        if kind != "none":
            return kind, event
    return "none", b""


_DONE = b"data: [DONE]"


class _Stream(StreamingResponse):
    """The rest of a started stream: what was held back, then the backend's events as they
    come (whole events only, so that a cut can be reported cleanly); on a backend failure,
    an error event. Always closes the backend response."""

    def __init__(self, state: RouterState, b: Backend, resp: httpx.Response, chunks: AsyncIterator[bytes],
                 held: bytes, pending: bytes, headers: dict[str, str], prompt_len: int) -> None:
        self._state = state
        self._backend = b
        self._resp = resp
        self._released = False
        # Counted when the response ends, however it ends: a client that hangs up as soon
        # as it reads [DONE] cancels the body at its last yield, before any code after it.
        self._saw_done = False
        self._status: str | None = None
        b.inflight_unstarted -= 1          # it started: no longer queued prefill
        b.inflight_tokens -= prompt_len
        super().__init__(self._body(chunks, held, pending), status_code=200, headers=headers,
                         media_type="text/event-stream")

    async def _body(self, chunks: AsyncIterator[bytes], held: bytes, pending: bytes) -> AsyncIterator[bytes]:
        state, b = self._state, self._backend
        if held:
            self._saw_done |= _DONE in held
            yield held
        try:
            async for c in chunks:
                pending += c
                cut = _last_boundary(pending)
                if cut:
                    self._saw_done |= _DONE in pending[:cut]
                    yield pending[:cut]
                    pending = pending[cut:]
            self._saw_done = True
            if pending:
                yield pending
        except (httpx.TimeoutException, httpx.TransportError) as e:
            why = _describe(e)
            state.mark_down(b, f"stream broke: {why}")
            state.metrics.midstream_failures.labels(b.url).inc()
            self._status = "502"
            msg = (f"backend {b.url} failed after the stream had started ({why}); "
                   f"the output so far cannot be resumed on another backend")
            yield b"data: " + json.dumps(_error_body(502, msg)).encode() + b"\n\n"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            pass
        finally:
            await self._resp.aclose()
            if not self._released:
                self._released = True
                self._backend.inflight -= 1
                # 499: the client went away before the stream's end
                status = self._status or ("200" if self._saw_done else "499")
                self._state.metrics.requests.labels(self._backend.url, status).inc()
