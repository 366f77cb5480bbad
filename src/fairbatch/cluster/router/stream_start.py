"""Has a stream started? The router may move a streamed request to another backend only
while nothing of it reached the client: it holds events back until one carries output.

An event is ``"output"`` (generated text, a finish, usage, ``[DONE]``, or anything the
router cannot judge: it passes that on), ``"error"`` (an error event: before any output,
a reason to retry), or ``"none"`` (a chat stream's leading role-only delta, a comment, a
keep-alive: it starts nothing).
"""

from __future__ import annotations

import json

from fairbatch.wire import sse
from fairbatch.wire.sse import event_payloads, events

DONE = sse.DONE.encode()


def event_kind(event: bytes) -> str:
    """``"output"`` (carries generated text, a finish, usage or [DONE]), ``"error"``, or
    ``"none"`` (a role-only chat delta, a comment, a keep-alive)."""
    kind = "none"
    for data in event_payloads(event):
        if data == DONE:
            return "output"
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return "output"                       # not ours to judge: pass it on
        if not isinstance(obj, dict):
            return "output"
        if obj.get("error") is not None:
            return "error"
        if obj.get("usage") and not obj.get("choices"):
            return "output"
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                return "output"
            if ch.get("finish_reason") is not None or ch.get("text"):
                return "output"
            delta = ch.get("delta")
            if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")
                                            or delta.get("reasoning_content")):
                return "output"
            if "text" in ch and not isinstance(ch.get("text"), str):
                return "output"
    return kind


def first_event_with_output(buf: bytes) -> tuple[str, bytes]:
    """The kind of the first complete event in ``buf`` that is not ``"none"``."""
    for event in events(buf):
        kind = event_kind(event)
        if kind != "none":
            return kind, event
    return "none", b""
