"""The router's state: its backends, the loads it routes on, its HTTP clients, and the
health transitions of a backend (up on a good poll; down on failed polls, or at once when
its process is gone)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from fairbatch.cluster.backend_load import empty_load
from fairbatch.cluster.router.backend import Backend
from fairbatch.cluster.router.config import RouterConfig
from fairbatch.cluster.router.metrics import RouterMetrics
from fairbatch.cluster.router.polling import LoadPoller
from fairbatch.routing import Router
from fairbatch.scheduler.base import Load

log = logging.getLogger("fairbatch.router")


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
        self.poller = LoadPoller(self)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.request_timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024))
        auth = {"Authorization": f"Bearer {cfg.backend_api_key}"} if cfg.backend_api_key else None
        self.poll_client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.poll_timeout), headers=auth,
                                             limits=httpx.Limits(max_connections=4 * len(self.backends) + 4))
        for b in self.backends:
            b.down = asyncio.Event()
            b.down.set()                   # unhealthy until its first good poll
        self.poller.start()

    async def stop(self) -> None:
        await self.poller.stop()
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

    def poll_failed(self, b: Backend, why: str) -> None:
        self.metrics.poll_failures.labels(b.url).inc()
        b.consecutive_failures += 1
        if b.consecutive_failures >= self.config.failures_to_mark_down or not b.healthy:
            self.mark_down(b, why)
        else:
            b.error = why

    # --- loads and routing -----------------------------------------------------------------------------
    def set_load(self, b: Backend, ld: Load, since: int) -> None:
        """``b``'s fresh load, requested when the router had made ``since`` sends."""
        b.load = ld
        b.load_wall = time.time()
        self.loads[b.index] = ld
        self.router.observe(b.index, ld, since)

    def choose(self, prompt_len: int, exclude: set[int], block_hashes: Sequence[int] | None = None) -> Backend | None:
        cand = [b.index for b in self.backends if b.healthy and b.index not in exclude]
        if not cand:
            return None
        t0 = time.perf_counter()
        k = self.router.choose(prompt_len, self.loads, cand, block_hashes=block_hashes)
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
