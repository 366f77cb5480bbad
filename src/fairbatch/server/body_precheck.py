"""Large bodies are parsed once in a helper process before the event loop parses them.

Why: parsing JSON (``json.loads``) and validating it (pydantic) hold the GIL from start to
end, so a thread cannot take them off the event loop; while a body of half a million
token ids is parsed, every stream on the server waits (docs/RELIABILITY.md). What makes a
body expensive is its number of JSON values, not its bytes (a 4 MB string is one value
and parses in milliseconds; 4 MB of ``1,`` is two million). A body larger than
``min_bytes`` is first parsed in a helper process, which counts its values: more than the
request could need (``max_values``: a few contexts' worth of token ids) or not JSON at all
is answered 400 from here, and the event loop never parses it. A body that passes is
parsed again by FastAPI on the loop, at a cost the context bounds.

The helper is one process (``spawn``; it imports only ``json_values``), started with the
app (so that its start-up is not paid by the first large body) and stopped with it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fairbatch.server.body_limit import replaying
from fairbatch.server.errors import error_response, format_validation_errors
from fairbatch.server.json_values import count_values, exit_with_parent, max_json_values

DEFAULT_MIN_BYTES = 128 << 10


class LargeBodyCheck:
    """Pure ASGI middleware, inside ``BodyLimit`` (which delivers the body whole)."""

    def __init__(self, app: Any, max_values: int, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        self.app = app
        self.max_values = max_values
        self.min_bytes = min_bytes
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                             initializer=exit_with_parent)
        return self._pool

    def close(self) -> None:
        """At the app's shutdown: the helper exits before the server does (waiting a moment
        here, off any request's path)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        message = await receive()
        body = message.get("body", b"") if message["type"] == "http.request" else b""
        if len(body) >= self.min_bytes and not message.get("more_body", False):
            kind, info = await self._count(body)
            if kind == "invalid":
                pos, why = info
                text, _ = format_validation_errors([{"type": "json_invalid", "loc": ("body", pos),
                                                     "ctx": {"error": why}}], body)
                await error_response(400, text)(scope, receive, send)
                return
            if kind == "too_many":
                await error_response(400, f"request body holds more than {self.max_values} JSON values (numbers, "
                                     f"strings, ...): more than any request to this model needs; send fewer or "
                                     f"shorter prompts per request")(scope, receive, send)
                return
        await self.app(scope, replaying(message, receive), send)

    async def _count(self, body: bytes) -> tuple[str, Any]:
        """The helper's count; a helper that died (killed, out of memory) is replaced once."""
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            try:
                return await loop.run_in_executor(self._executor(), count_values, body, self.max_values)
            except BrokenProcessPool:
                self._pool = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _lifespan_receive(self, receive: Any) -> Any:
        async def wrapped() -> Any:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._executor().submit(int)            # the helper starts now, off the loop
            elif message["type"] == "lifespan.shutdown":
                self.close()
            return message
        return wrapped


__all__ = ["LargeBodyCheck", "count_values", "max_json_values"]
