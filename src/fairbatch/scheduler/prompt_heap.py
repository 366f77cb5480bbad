"""The waiting prompts of FairBatching and QoServe in their prefill order.

A prompt's order key (its first-token deadline plus the work left) is fixed while it
waits, except when a cached prefix is taken or given back (prefix_reuse.py): a heap keyed
when the prompt is queued replaces sorting the queue every step, and finding the next
prompt costs O(log n). When the key changes the prompt is pushed again (``rekey``).

Entries are not removed when they stop counting; they go stale and are dropped when they
reach the top, or all at once when ``waiting`` finds more stale entries than live ones.
An entry is stale when its request left the queue (admitted, aborted, or relegated, which
moves a prompt to the relegated queue) or was pushed again since (the newer entry holds
its current key).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any
from itertools import count

from fairbatch.request import Request, RequestState


_WAITING = RequestState.WAITING


def in_prompt_queue(req: Request) -> bool:
    """``req`` waits among the prompts on time (a heap's domain)."""
    # relegated prompts wait in Scheduler.relegated; a relegated request preempted after its
    # first token is recomputed from here like any other
    return req.state is _WAITING and not (req.relegated and not req.generated)


class PromptHeap:
    def __init__(self, key: Callable[[Request], Any]) -> None:   # any ordered key: a float, a tuple
        self._key = key
        self._entries: list[tuple[Any, int, Request]] = []   # (key, seq, request)
        self._seq = count()
        self._latest: dict[str, tuple[Any, int, Request]] = {}   # request id -> its newest entry

    def __len__(self) -> int:
        """Entries, stale ones included."""
        return len(self._entries)

    def push(self, req: Request) -> None:
        """Queue ``req`` under its current key; an older entry of it goes stale."""
        entry = (self._key(req), next(self._seq), req)
        self._latest[req.request_id] = entry
        heapq.heappush(self._entries, entry)

    def rekey(self, req: Request) -> None:
        """``req``'s work left changed: if it is queued here and its key moved, it is pushed
        again under the new one."""
        entry = self._latest.get(req.request_id)
        if entry is not None and in_prompt_queue(req) and self._key(req) != entry[0]:
            self.push(req)

    def discard(self, req: Request) -> None:
        """``req`` left the queue: its entries go stale."""
        self._latest.pop(req.request_id, None)

    def head(self) -> Request | None:
        """The waiting prompt with the smallest key, dropping stale entries above it."""
        entry = self.head_entry()
        return entry[2] if entry is not None else None

    def head_entry(self) -> tuple | None:
        """``(key, seq, request)`` of the waiting prompt with the smallest key (the key it
        was queued under), dropping stale entries above it."""
        entries, latest = self._entries, self._latest
        while entries:
            entry = entries[0]
            req = entry[2]
            if latest.get(req.request_id) is entry:
                if req.state is _WAITING and not (req.relegated and not req.generated):   # in_prompt_queue
                    return entry
                del latest[req.request_id]
            heapq.heappop(entries)
        return None

    def waiting(self) -> list[Request]:
        """The waiting prompts, each once, in prefill order (by key, then the order they
        were pushed in). Compacts the heap when stale entries outnumber live ones, so a
        call costs O(live) amortized."""
        entries, latest = self._entries, self._latest
        live = [e for e in entries if latest.get(e[2].request_id) is e and in_prompt_queue(e[2])]
        live.sort()       # (key, seq): seq is unique, so requests are never compared
        if len(live) * 2 < len(entries):
            self._entries = live[:]     # a sorted list is a heap
            self._latest = {e[2].request_id: e for e in live}
        return [e[2] for e in live]
