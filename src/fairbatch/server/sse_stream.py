"""Streaming a request's choices as server-sent events, the same for completions and
chat: ``first_output`` holds the HTTP status back until the first output (or refusal)
exists; ``stream_events`` is the event loop (one event per choice per step, the usage
events ``stream_options`` asks for, an error event on a failure, ``[DONE]``);
``SSEResponse`` always aborts what is left when the stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from fairbatch.server.async_engine import RequestGroup
from fairbatch.server.choice_stream import Failure, Output, procs_of, usage
from fairbatch.server.disconnect import wait_disconnect
from fairbatch.server.errors import APIError, error_body
from fairbatch.server.output import OutputProcessor
from fairbatch.server.protocol import StreamOptions
from fairbatch.wire.sse import DONE_EVENT, encode_event


async def first_output(outputs: AsyncIterator[Output | Failure], group: RequestGroup, raw: Request
                       ) -> AsyncIterator[Output | Failure]:
    """Wait, without sending anything, for a streamed request's first output: a request
    refused (429) or failed (500) before it produced any gets a real HTTP status, not a
    stream that began 200. Returns the outputs, the first one included; raises
    ``APIError`` for a refusal, a failure, or a client that left first (its requests
    aborted)."""
    group.streaming = True          # before its first delta can arrive: AsyncEngine waits for its first write
    first = asyncio.ensure_future(outputs.__anext__())
    watch = asyncio.ensure_future(wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({first, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not first.done():
            first.cancel()          # its generator's cleanup aborts the requests
            group.abort()
    if first not in done:
        raise APIError(499, "client disconnected")
    try:
        ev = first.result()
    except StopAsyncIteration:      # cannot happen (every request has a choice); never hang on it
        ev = Failure(500, "the request ended without output")
    if isinstance(ev, Failure):
        await outputs.aclose()
        raise ev.error()
    return _prepend(ev, outputs)


async def _prepend(first: Output, rest: AsyncIterator[Output | Failure]) -> AsyncIterator[Output | Failure]:
    try:
        yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()         # type: ignore[attr-defined]


class SSEResponse(StreamingResponse):
    """An SSE stream that always closes its generator and aborts its requests, whether the
    stream ended, the client disconnected, or the send failed."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = content
        self._group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            pass   # the client went away mid-send
        finally:
            self._group.abort()
            aclose = getattr(self._gen, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:   # noqa: BLE001
                    pass


_compact_json = json.JSONEncoder(separators=(",", ":")).encode     # as wire.sse.encode_event writes


class ChunkEvents:
    """``encode_event({**base, "choices": [...], "usage": ...})`` byte for byte, with
    ``base`` (id, object, created, model) encoded once per stream instead of per token."""

    def __init__(self, base: dict[str, Any]) -> None:
        if "choices" in base or "usage" in base:
            raise ValueError("base holds the fields every chunk shares, not choices or usage")
        shared = _compact_json(base)[1:-1]
        self._head = "data: {" + shared + ("," if shared else "") + '"choices":['

    def event(self, *choices: dict[str, Any], usage: dict[str, Any] | None = None) -> str:
        body = ",".join(map(_compact_json, choices))
        tail = "]}\n\n" if usage is None else '],"usage":' + _compact_json(usage) + "}\n\n"
        return self._head + body + tail


# One choice's part of a chunk: (index, text, finish_reason, its processor, its first?).
ChoiceChunk = Callable[[int, str, "str | None", OutputProcessor, bool], dict[str, Any]]


async def stream_events(outputs: AsyncIterator[Output | Failure], group: RequestGroup, base: dict[str, Any],
                        prompt_tokens: int, usage_opts: StreamOptions | None, choice_chunk: ChoiceChunk,
                        opening: Callable[[int], dict[str, Any]] | None = None) -> AsyncIterator[str]:
    """The events of a stream: one chunk per output (``base`` plus the choice from
    ``choice_chunk``), preceded at a choice's first output by ``opening(index)``'s chunk in
    the same write (chat's role delta: a client stamping TTFT at the first chunk then
    measures the first token); usage per chunk (``continuous_usage_stats``) or at the end
    (``include_usage``); an error event instead of the rest on a failure; ``[DONE]``."""
    started: set[int] = set()
    chunks = ChunkEvents(base)
    continuous = bool(usage_opts and usage_opts.continuous_usage_stats)
    async for ev in outputs:
        if isinstance(ev, Failure):
            yield encode_event(error_body(ev.status, ev.message))
            break
        i, text, reason, procs = ev
        first = i not in started
        started.add(i)
        head = chunks.event(opening(i)) if first and opening is not None else ""
        yield head + chunks.event(choice_chunk(i, text, reason, procs[i], first),
                                  usage=usage(prompt_tokens, procs) if continuous else None)
        if first:                   # resumed: the response wrote it to the connection
            group.first_chunk_written(i)
    else:
        if usage_opts and usage_opts.include_usage:
            yield chunks.event(usage=usage(prompt_tokens, procs_of(group)))
    yield DONE_EVENT
