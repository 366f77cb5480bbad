"""FairBatching's waiting prompts in prefill order.

A prompt's order key (its first-token deadline plus the work left) cannot change while it
waits, so a heap keyed when the prompt is queued replaces sorting the queue every step:
finding the next prompt costs O(log n). Entries are not removed when their request leaves
the queue (admitted, aborted, or relegated, which moves a prompt to the relegated queue);
they go stale and are dropped when they reach the top.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from itertools import count

from fairbatch.request import Request, RequestState


_WAITING = RequestState.WAITING


def _live(req: Request) -> bool:
    # relegated prompts wait in Scheduler.relegated; a relegated request preempted after its
    # first token is recomputed from here like any other
    return req.state is _WAITING and not (req.relegated and not req.generated)


class PromptHeap:
    def __init__(self, key: Callable[[Request], float]) -> None:
        self._key = key
        self._entries: list[tuple[float, int, Request]] = []   # (key, seq, request)
        self._seq = count()

    def __len__(self) -> int:
        """Entries, stale ones included."""
        return len(self._entries)

    def push(self, req: Request) -> None:
        heapq.heappush(self._entries, (self._key(req), next(self._seq), req))

    def head(self) -> Request | None:
        """The waiting prompt with the smallest key, dropping stale entries above it."""
        entries = self._entries
        while entries:
            req = entries[0][2]
            if req.state is _WAITING and not (req.relegated and not req.generated):   # _live
                return req
            heapq.heappop(entries)
        return None

    def pop(self) -> None:
        """Drop the top entry (the one ``head`` returned)."""
        heapq.heappop(self._entries)

    def waiting(self) -> list[Request]:
        """The waiting prompts, each once, in heap (not key) order."""
        return list({id(e[2]): e[2] for e in self._entries if _live(e[2])}.values())
