"""What the OpenAI handlers (``completions.py``, ``chat.py``) share: the model, the
engine, and the server's limits; admission of a request's choices into the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from fairbatch.server.async_engine import AsyncEngine, EngineDead, QueueFull, RequestGroup
from fairbatch.server.errors import APIError
from fairbatch.server.metrics import ServerMetrics
from fairbatch.server.model import ServedModel

# A body larger than this is tokenized and turned into requests on a worker thread: the
# tokenizer (Rust) and the checks run there while the event loop keeps streaming. Smaller
# ones stay on the loop, where they cost less than the hop.
OFFLOAD_BODY_BYTES = 64 << 10

T = TypeVar("T")


@dataclass(frozen=True)
class Serving:
    model: ServedModel
    engine: AsyncEngine
    metrics: ServerMetrics
    retry_after: int                      # seconds, on every 503 and 429
    max_choices: int                      # prompts x n one request may ask for
    default_max_tokens: int | None        # a chat request's output limit when it gives none

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model.names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")

    def submit(self, reqs: list[Any]) -> RequestGroup:
        """Hand ``reqs`` (one request's choices) to the engine: 503 when the server is full
        or its engine is gone."""
        try:
            return self.engine.add(reqs)
        except QueueFull as e:
            self.metrics.on_reject(len(reqs))
            raise APIError(503, f"server is at capacity: {e}; retry later",
                           headers={"Retry-After": str(self.retry_after)}) from None
        except EngineDead as e:
            raise APIError(503, f"engine unavailable: {e}", headers={"Retry-After": str(self.retry_after)}) from None


async def off_loop_if_heavy(raw: Request, fn: Callable[[], T]) -> T:
    """``fn()`` on a worker thread for a large body (tokenizing, scanning), else here."""
    size = raw.headers.get("content-length", "")
    if size.isdigit() and int(size) <= OFFLOAD_BODY_BYTES:
        return fn()
    return await run_in_threadpool(fn)
