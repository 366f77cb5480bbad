"""Load polling: every backend's ``GET /load`` on its own task, every ``poll_interval``
seconds (``down_poll_interval`` while it is unhealthy). A backend without ``/load``
(vLLM, SGLang: a 404 on the first poll) is polled on ``/health`` instead, and its load is
what the router itself has open there. One failed poll is not a dead backend
(``RouterState.poll_failed`` counts them); a poller never dies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import httpx

from fairbatch.cluster.backend_load import load_from_json
from fairbatch.cluster.router.backend import Backend
from fairbatch.cluster.router.failures import PollError, describe
from fairbatch.scheduler.base import Load

if TYPE_CHECKING:
    from fairbatch.cluster.router.state import RouterState

log = logging.getLogger("fairbatch.router")


class LoadPoller:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self._tasks: list[asyncio.Task[None]] = []
        self.first_poll_done = asyncio.Event()
        self._polled = 0

    def start(self) -> None:
        self.first_poll_done = asyncio.Event()
        self._polled = 0
        for b in self.state.backends:
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

    async def wait_first_polls(self) -> None:
        """Until every backend was polled once (bounded): a router that answers before that
        sends everything to whichever backend it heard from first, or answers 503."""
        cfg = self.state.config
        wait = cfg.startup_wait if cfg.startup_wait is not None else 2 * cfg.poll_timeout + 1.0
        try:
            await asyncio.wait_for(self.first_poll_done.wait(), wait)
        except asyncio.TimeoutError:
            log.warning("not every backend answered its first poll within %.3g s; serving anyway", wait)

    async def poll_once(self, b: Backend) -> None:
        state = self.state
        assert state.poll_client is not None
        since = state.router.num_sent
        try:
            if b.has_load is False:
                r = await state.poll_client.get(b.url + "/health")
                if r.status_code != 200:
                    raise PollError(f"/health answered HTTP {r.status_code}")
                state.set_load(b, _inflight_load(b), state.router.num_sent)
            else:
                r = await state.poll_client.get(b.url + "/load")
                if r.status_code == 404 and b.has_load is None:
                    b.has_load = False
                    await self.poll_once(b)
                    return
                if r.status_code != 200:
                    raise PollError(f"/load answered HTTP {r.status_code}")
                try:
                    ld = load_from_json(r.json(), time=time.monotonic())
                except ValueError as e:
                    raise PollError(f"bad /load answer: {e}") from None
                b.has_load = True
                state.set_load(b, ld, since)
            state.mark_up(b)
        except httpx.TimeoutException:
            state.poll_failed(b, f"load poll timed out after {state.config.poll_timeout:g} s")
        except httpx.HTTPError as e:
            state.poll_failed(b, f"load poll failed: {describe(e)}")
        except PollError as e:
            state.poll_failed(b, str(e))

    async def _poll_loop(self, b: Backend) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.state.config
        first = True
        while True:
            t0 = loop.time()
            try:
                await self.poll_once(b)
            except Exception as e:   # noqa: BLE001 - a poller must never die
                log.exception("load poll of %s raised", b.url)
                self.state.poll_failed(b, f"load poll raised {type(e).__name__}")
            if first:
                first = False
                self._polled += 1
                if self._polled >= len(self.state.backends):
                    self.first_poll_done.set()
            interval = cfg.poll_interval if b.healthy else cfg.down_poll_interval
            await asyncio.sleep(max(0.0, t0 + interval - loop.time()))


def _inflight_load(b: Backend) -> Load:
    """For a backend without /load: what the router itself has open there."""
    return Load(running=b.inflight - b.inflight_unstarted, waiting=b.inflight_unstarted, kv_usage=0.0,
                free_blocks=0, num_blocks=0, queued_prefill_tokens=b.inflight_tokens,
                admission_budget=float(-b.inflight_tokens), time=time.monotonic())
