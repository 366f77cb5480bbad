"""One try of a request on one backend: a response to hand the client, or ``Retry``.

A request may move to another backend while nothing of it was sent to the client: no
response headers for a non-streaming request, no event carrying output for a streaming
one (``stream_start.py``). Causes: a transport error, a 5xx answer, a 429 (the backend's
scheduler refused it: another may still make it in time), an error event before any
output, or the backend marked unhealthy while the request waited (``race``). Other 4xx
answers are the client's and pass through.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi.responses import Response

from fairbatch.cluster.router.backend import Backend
from fairbatch.cluster.router.failures import ClientGone, Retry, describe
from fairbatch.cluster.router.relay import StartedStream
from fairbatch.cluster.router.state import RouterState
from fairbatch.cluster.router.stream_start import first_event_with_output
from fairbatch.wire import sse
from fairbatch.wire.errors import DROPPED_REASON_HEADER, describe_error

_FORWARD_RESPONSE_HEADERS = ("content-type", "cache-control", "x-accel-buffering", "retry-after", "x-request-id",
                             DROPPED_REASON_HEADER)


async def race(aw: Any, b: Backend, gone: asyncio.Future[Any]) -> Any:
    """Await ``aw``, unless the backend goes unhealthy (``Retry``) or the client goes away
    (``ClientGone``) first; the loser is cancelled."""
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
        raise ClientGone()
    raise Retry("unhealthy", f"{b.url} was marked unhealthy while the request waited ({b.error})")


async def attempt(state: RouterState, b: Backend, url: str, body: bytes, headers: dict[str, str], stream: bool,
                   gone: asyncio.Future[Any], prompt_len: int) -> Response:
    """One try on backend ``b``: a Response to return, or ``Retry``."""
    client = state.client
    assert client is not None
    req = client.build_request("POST", url, content=body, headers=headers)
    try:
        resp: httpx.Response = await race(client.send(req, stream=True), b, gone)
    except (httpx.TimeoutException, httpx.TransportError) as e:
        state.request_failed(b, f"request failed: {describe(e)}", e)
        raise Retry("transport", describe(e)) from None
    ok = False
    try:
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE_HEADERS}
        out_headers["x-fairbatch-backend"] = b.url
        if resp.status_code != 200:
            content = await race(resp.aread(), b, gone)
            answer = Response(content, status_code=resp.status_code, headers=out_headers)
            if resp.status_code == 429:   # refused (late=reject): another backend may still make it in time
                raise Retry("rejected", f"HTTP 429: {describe_error(content)}", answer)
            if resp.status_code == 503:
                raise Retry("busy", f"HTTP 503: {describe_error(content)}", answer)
            if resp.status_code >= 500:
                raise Retry("server_error", f"HTTP {resp.status_code}: {describe_error(content)}", answer)
            return answer                 # other 4xx: the client's to see
        if not stream or not resp.headers.get("content-type", "").startswith("text/event-stream"):
            content = await race(resp.aread(), b, gone)
            return Response(content, status_code=200, headers=out_headers)
        chunks = resp.aiter_raw()
        buf = b""
        while True:
            buf += await race(chunks.__anext__(), b, gone)
            kind, event = first_event_with_output(buf)
            if kind == "error":
                raise Retry("stream_error", f"error before any output: {describe_error(event)}")
            if kind == "output":
                break
        ok = True
        cut = sse.complete_end(buf)
        return StartedStream(state, b, resp, chunks, buf[:cut], buf[cut:], out_headers, prompt_len)
    except StopAsyncIteration:
        raise Retry("stream_error", "the stream ended before any output") from None
    except (httpx.TimeoutException, httpx.TransportError) as e:
        state.request_failed(b, f"request failed: {describe(e)}", e)
        raise Retry("transport", describe(e)) from None
    finally:
        if not ok:
            await resp.aclose()
