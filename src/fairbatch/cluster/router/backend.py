"""One backend as the router sees it: its health, its last polled load, and what the
router itself has open on it."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from fairbatch.scheduler.base import Load


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
