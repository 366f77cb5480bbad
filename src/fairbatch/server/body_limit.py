"""Request bodies: how large, and how long they may take to arrive.

Why a limit sized from the context: the event loop parses a body (``json.loads``) and
validates it (pydantic) in C and Rust code that never releases the GIL, so no thread can
take that work off the loop: while a 60 MB body is parsed, every other stream waits
(seconds, measured in docs/RELIABILITY.md). The only real bound is the body's size. A full
context as JSON token ids is at most ~8 bytes a token (``123456,``) and as text a few
characters a token, so ``body_limit`` allows 64 bytes a token of context, plus 1 MiB for
the rest of a body (messages' roles, stop strings, a batch of short prompts): a 2k-token
model takes 1.1 MiB, a 128k-token one 9 MiB.

Why a read timeout: a client that sends its body slowly holds its buffer and a connection
for as long as it likes. The whole body must arrive within ``timeout`` seconds of the
first byte the app asks for; else 408.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fairbatch.server.errors import error_response

BYTES_PER_CONTEXT_TOKEN = 64
BODY_OVERHEAD_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT = 60.0


def body_limit(max_model_len: int) -> int:
    """The largest request body worth reading for a model with this context."""
    return BODY_OVERHEAD_BYTES + BYTES_PER_CONTEXT_TOKEN * max(0, int(max_model_len))


def replaying(message: dict[str, Any], receive: Any) -> Any:
    """An ASGI ``receive`` that gives ``message`` (a body already read) once, then passes the
    calls on to ``receive`` (the server's: disconnect detection)."""
    replayed = False

    async def replay() -> Any:
        nonlocal replayed
        if not replayed:
            replayed = True
            return message
        return await receive()

    return replay


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over ``max_bytes`` (declared or streamed), 408
    for one that takes over ``timeout`` seconds to arrive. The body is read here (FastAPI
    buffers it whole anyway) and replayed to the app, whose later ``receive`` calls go to
    the server (disconnect detection)."""

    def __init__(self, app: Any, max_bytes: int, timeout: float | None = DEFAULT_BODY_TIMEOUT,
                 why: str = "") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.why = why                  # appended to the 413's message

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        # Connection: close: the rest of the body is not worth reading. Without it the server
        # reads (and drops) what the client still sends, tens of MB, on the event loop.
        too_big = error_response(413, f"request body larger than {limit} bytes{self.why}",
                                 headers={"Connection": "close"})
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await too_big(scope, receive, send)
                return
        try:
            async with asyncio.timeout(self.timeout):
                parts = await self._read(receive, limit)
        except TimeoutError:
            await error_response(408, f"request body not received within {self.timeout:g} s",
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        if parts is None:                       # gone before the body arrived
            return
        if parts is False:
            await too_big(scope, receive, send)
            return
        body = {"type": "http.request", "body": b"".join(parts), "more_body": False}
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    async def _read(receive: Any, limit: int) -> list[bytes] | None | bool:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return False
            parts.append(body)
            if not message.get("more_body", False):
                return parts


__all__ = ["BodyLimit", "body_limit"]
