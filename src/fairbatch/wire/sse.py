"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per event, the stream
closed by ``data: [DONE]``.

Writing: ``encode_event``. Reading, two ways: a client that times every event splits the
byte stream into ``lines`` as they come; a proxy that must forward whole events only
splits at event ends (``events``, ``complete_end``). Both split on line feeds only, never on
U+2028 / U+0085, which a server may leave raw inside its JSON (httpx's ``aiter_lines``
would split there and cut the event in two).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any, AnyStr

DONE = "[DONE]"
DONE_EVENT = "data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def encode_event(obj: Any) -> str:
    # ASCII-only JSON (json.dumps' default): a raw U+2028 / U+0085 in generated text is a line
    # break to clients that split lines like str.splitlines, which would cut the event in two.
    return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"


def data_payload(line: AnyStr) -> AnyStr | None:
    """The payload of a ``data:`` line, stripped; None for any other line (a comment, a
    blank separator, ``event:``)."""
    prefix = "data:" if isinstance(line, str) else b"data:"
    if not line.startswith(prefix):      # type: ignore[arg-type]
        return None
    return line[5:].strip()


def event_payloads(event: bytes) -> Iterator[bytes]:
    """The payloads of one event's ``data:`` lines."""
    for line in event.split(b"\n"):
        payload = data_payload(line.rstrip(b"\r"))
        if payload is not None:
            yield payload


def complete_end(buf: bytes) -> int:
    """Index just past the last complete event in ``buf`` (0 if none)."""
    end = 0
    for m in _EVENT_END.finditer(buf):
        end = m.end()
    return end


def events(buf: bytes) -> Iterator[bytes]:
    """The complete events in ``buf``, without their terminating blank line."""
    pos = 0
    for m in _EVENT_END.finditer(buf):
        yield buf[pos:m.start()]
        pos = m.end()


async def lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The lines of a byte stream as they arrive, split on LF (a CRLF loses its CR)."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", "replace")
