"""The engine's per-step deltas of a request's choices -> text per choice.

``choice_outputs`` turns what the engine sends (token ids, logprobs, a finish, an error,
a refusal) into ``(index, text, finish_reason, processors)`` per choice per step, through
one ``OutputProcessor`` per choice (detokenizing, stop strings); ``Failure`` when the
engine failed a request (500) or the scheduler refused one (429, ``late=reject``).
``collect`` runs a non-streaming request to its end; the streaming side is
``sse_stream.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from fairbatch.server.async_engine import RequestGroup
from fairbatch.server.disconnect import wait_disconnect
from fairbatch.server.errors import DROPPED_REASON_HEADER, LATE_REJECT_REASON, APIError
from fairbatch.server.model import ServedModel
from fairbatch.server.output import OutputProcessor
from fairbatch.server.protocol import _Sampling


def usage(prompt_tokens: int, procs: Sequence[OutputProcessor]) -> dict[str, Any]:
    """OpenAI's usage object; with prefix caching on, ``prompt_tokens_details.cached_tokens``
    too (always, 0 included, as OpenAI's API; vLLM sends it only with
    --enable-prompt-tokens-details and only when not 0)."""
    out = sum(p.num_tokens for p in procs)
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": out,
                         "total_tokens": prompt_tokens + out}
    counted = [p for p in procs if p.reports_cached]
    if counted:
        u["prompt_tokens_details"] = {"cached_tokens": sum(p.cached_tokens or 0 for p in counted)}
    return u


def procs_of(group: RequestGroup) -> list[OutputProcessor]:
    return getattr(group, "processors", [])


@dataclass(slots=True)
class Failure:
    """A request that ends without (more) output: the engine failed it (500), or the
    scheduler refused it (429, ``late=reject``)."""

    status: int
    message: str
    headers: dict[str, str] | None = None

    def error(self) -> APIError:
        return APIError(self.status, self.message, headers=self.headers)


def refusal(req: Any, retry_after: int) -> Failure:
    return Failure(
        429, f"request refused ({LATE_REJECT_REASON}): it can no longer meet its time-to-first-token SLO of "
        f"{req.slo.ttft * 1e3:g} ms (the scheduler runs with late=reject); retry later, or with a looser "
        f"slo.ttft_ms", {"Retry-After": str(retry_after), DROPPED_REASON_HEADER: LATE_REJECT_REASON})


Output = tuple[int, str, "str | None", list[OutputProcessor]]


async def choice_outputs(group: RequestGroup, model: ServedModel, body: _Sampling, retry_after: int = 1
                         ) -> AsyncIterator[Output | Failure]:
    """Every delta of every choice as ``(index, text, finish_reason, processors)``; one item
    per engine step per choice (also when its text is held back and empty), so a client
    sees one event per generated token. Yields a ``Failure`` and stops if the engine
    failed a request or the scheduler refused one. Aborts whatever is left when it ends,
    however it ends."""
    n = len(group.requests)
    stops = body.stop_strings()
    procs = [OutputProcessor(model.decode, stops, include_stop_str=body.include_stop_str_in_output,
                             min_tokens=body.min_tokens, stop_token_ids=body.stop_token_ids or ())
             for _ in range(n)]
    for i, proc in enumerate(procs):
        proc.reports_cached = model.prefix_caching and i % body.n == 0
    group.processors = procs   # type: ignore[attr-defined]
    closed: set[int] = set()
    try:
        while len(closed) < n:
            idx, d = await group.queue.get()
            if idx in closed:
                continue
            if d.error is not None:
                yield Failure(500, f"request failed: {d.error}")
                return
            if d.rejected:
                yield refusal(group.requests[idx], retry_after)
                return
            proc = procs[idx]
            if d.start == 0 and d.token_ids:
                group.engine.first_token_delivered(d)    # yielded to its writer next
            proc.add_logprobs(d.logprobs, d.prompt_logprobs)
            if d.cached_tokens is not None:
                proc.cached_tokens = d.cached_tokens
            text = proc.feed(d.token_ids, final=d.finish_reason is not None,
                             stopped_by_token=d.finish_reason == "stop")
            reason = d.finish_reason
            if proc.finish_reason == "stop" and reason is None:
                reason = "stop"
                group.abort(idx, finished=True)     # a stop string: finished, not aborted
            if reason is not None:
                closed.add(idx)
            yield idx, text, reason, procs
        metrics = getattr(group.engine, "metrics", None)
        if metrics is not None:       # every choice finished: vLLM's per-request n and longest output
            metrics.on_request_done(body.n, [p.num_tokens for p in procs])
    finally:
        group.abort()


async def collect(group: RequestGroup, model: ServedModel, body: _Sampling, raw: Request,
                   retry_after: int = 1) -> list[tuple[str, str | None]]:
    """Run a non-streaming request to the end; abort it if the client disconnects first.
    Raises ``APIError`` if the engine failed it (500) or the scheduler refused it (429)."""
    texts = [""] * len(group.requests)
    reasons: list[str | None] = [None] * len(group.requests)

    async def consume() -> Failure | None:
        async for ev in choice_outputs(group, model, body, retry_after):
            if isinstance(ev, Failure):
                return ev
            i, text, reason, _ = ev
            texts[i] += text
            if reason is not None:
                reasons[i] = reason
        return None

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            group.abort()
            raise APIError(499, "client disconnected")
        error = work.result()
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        group.abort()
    if error is not None:
        raise error.error()
    return list(zip(texts, reasons, strict=True))
