"""The relay of a stream that has started on a backend: it can no longer move, so a
backend lost now ends it with an OpenAI-format ``error`` event naming the backend and the
cause (and no ``[DONE]``): the client is told clearly that the output cannot be resumed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from fastapi.responses import StreamingResponse

from fairbatch.cluster.router.backend import Backend
from fairbatch.cluster.router.failures import describe
from fairbatch.wire import sse
from fairbatch.wire.errors import error_body

if TYPE_CHECKING:
    from fairbatch.cluster.router.state import RouterState

_DONE = ("data: " + sse.DONE).encode()


class StartedStream(StreamingResponse):
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
                cut = sse.complete_end(pending)
                if cut:
                    self._saw_done |= _DONE in pending[:cut]
                    yield pending[:cut]
                    pending = pending[cut:]
            self._saw_done = True
            if pending:
                yield pending
        except (httpx.TimeoutException, httpx.TransportError) as e:
            why = describe(e)
            state.mark_down(b, f"stream broke: {why}")
            state.metrics.midstream_failures.labels(b.url).inc()
            self._status = "502"
            msg = (f"backend {b.url} failed after the stream had started ({why}); "
                   f"the output so far cannot be resumed on another backend")
            yield sse.encode_event(error_body(502, msg)).encode()

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
