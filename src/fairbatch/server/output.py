"""Per-choice output processing on the event loop: incremental detokenisation and stop
strings.

Detokenisation follows vLLM's incremental scheme: decode a short window of recent ids
twice (with and without the new ones) and emit the difference, holding text back while
it ends in an incomplete UTF-8 sequence. Stop strings are searched in the accumulated
text; while streaming, the last ``len(longest stop) - 1`` characters are held back so a
stop string split across tokens is never half-sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class OutputProcessor:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""            # all text decoded so far (stop string cut off once found)
        self._sent = 0            # characters of self.text already returned
        self._prefix = 0          # window start
        self._read = 0            # ids up to here are reflected in self.text
        self.finish_reason: str | None = None   # "stop" once a stop string matched

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def feed(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Add the step's new tokens; returns the text to send now (may be empty).

        ``final``: the request finished; flush everything still held back. After a stop
        string matched, further calls return "" (the caller aborts the request)."""
        if self.finish_reason is not None:
            return ""
        self.ids.extend(token_ids)
        if token_ids or final:
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            new_text = self._decode(self.ids[self._prefix:])
            if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
                before = len(self.text)
                self.text += new_text[len(prefix_text):]
                self._prefix, self._read = self._read, len(self.ids)
                if self.stop:
                    start = max(0, before - self._hold)
                    hit = -1
                    for s in self.stop:
                        i = self.text.find(s, start)
                        if i != -1 and (hit == -1 or i < hit):
                            hit = i
                    if hit != -1:
                        self.text = self.text[:hit]
                        self.finish_reason = "stop"
                        final = True
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out
