"""Per-choice output processing on the event loop: incremental detokenisation and stop
strings, vLLM's ``stop_reason`` and ``include_stop_str_in_output``.

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
    """One choice's text, as vLLM's detokenizer produces it.

    ``include_stop_str``: keep a matched stop string at the end of the text (nothing is
    then held back). ``min_tokens``: stop strings are only looked for in text of tokens
    after the first ``min_tokens`` (vLLM's rule). A request the engine stopped with EOS or
    one of ``stop_token_ids`` does not show that token's text unless ``include_stop_str``;
    ``stop_reason`` is the matched stop string or stop token id (None for EOS or length).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (), *,
                 include_stop_str: bool = False, min_tokens: int = 0, stop_token_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self.stop = [s for s in stop if s]
        self.include_stop_str = include_stop_str
        self.min_tokens = min_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        # a stop string may end in the newest text and begin up to this far before it
        self._span = max((len(s) for s in self.stop), default=1) - 1
        self._hold = 0 if include_stop_str else self._span     # characters held back while streaming
        self.ids: list[int] = []  # ids whose text is shown
        self.num_tokens = 0       # output tokens, shown or not (usage)
        self.text = ""            # all text decoded so far (cut at a stop string once found)
        self._sent = 0            # characters of self.text already returned
        self._prefix = 0          # window start
        self._read = 0            # ids up to here are reflected in self.text
        self._stop_floor = 0      # stop strings are searched from here (min_tokens)
        self.finish_reason: str | None = None   # "stop" once a stop string matched
        self.stop_reason: str | int | None = None
        # logprob entries of tokens not yet sent (the endpoint takes them with each chunk)
        self.pending_logprobs: list = []
        self.prompt_logprobs: list | None = None
        # prompt tokens the prefix cache held when the engine first scheduled this choice
        # (with its first tokens); reports_cached: usage counts them (with caching on, the
        # first choice of each prompt: usage counts a prompt once, whatever n)
        self.cached_tokens: int | None = None
        self.reports_cached = False

    def feed(self, token_ids: Sequence[int], final: bool = False, stopped_by_token: bool = False) -> str:
        """Add the step's new tokens; returns the text to send now (may be empty).

        ``final``: the request finished; flush everything still held back.
        ``stopped_by_token``: the engine stopped it with its last token (EOS or a stop
        token id). After a stop string matched, further calls return "" (the caller
        aborts the request)."""
        if self.finish_reason is not None:
            return ""
        self.num_tokens += len(token_ids)
        if stopped_by_token and token_ids:
            last = token_ids[-1]
            self.stop_reason = last if last in self.stop_token_ids else None
            if not self.include_stop_str:
                token_ids = token_ids[:-1]
        self.ids.extend(token_ids)
        if token_ids or final:
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            new_text = self._decode(self.ids[self._prefix:])
            if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
                before = len(self.text)
                self.text += new_text[len(prefix_text):]
                self._prefix, self._read = self._read, len(self.ids)
                if self.stop and self.num_tokens > self.min_tokens:
                    final = self._find_stop(max(self._stop_floor, before - self._span)) or final
        if self.num_tokens <= self.min_tokens:
            self._stop_floor = len(self.text)
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out

    def _find_stop(self, start: int) -> bool:
        """Cut the text at the stop string that ends first from ``start`` on (ties: list
        order, as vLLM); True if one matched."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i + len(s) < best[0] + len(best[2])):
                best = (i, len(s), s)
        if best is None:
            return False
        i, n, s = best
        self.text = self.text[:i + n] if self.include_stop_str else self.text[:i]
        self.finish_reason = "stop"
        self.stop_reason = s
        return True

    def add_logprobs(self, entries: list | None, prompt: list | None) -> None:
        if entries:
            self.pending_logprobs.extend(entries)
        if prompt is not None:
            self.prompt_logprobs = prompt

    def take_logprobs(self) -> list:
        out, self.pending_logprobs = self.pending_logprobs, []
        return out
