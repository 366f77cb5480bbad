"""``Router``: the base of every routing policy (which instance gets a new request).

Shared by the cluster simulator (``fairbatch.sim.loop``) and the HTTP router
(``fairbatch.cluster.router``), which both sit above this package. A router sees each
instance's ``Load`` — possibly stale: a real router polls, the simulator refreshes at most
every ``load_interval`` seconds — and the new request's prompt length.

**Sent-since-poll accounting.** A stale load does not know about the requests the router
itself sent after it was measured; a burst routed on one stale view would all go to the
same "best" instance. So every load-reading router keeps, per instance, what it sent
since the load it last saw (requests, prompt tokens, KV blocks) and adds that on top:

- ``least_requests``: running + waiting + sent;
- ``llumnix``: free blocks - blocks of queued prompts - blocks of sent prompts;
- ``admission``: admission budget - sent prompt tokens.

The simulator's loads are measured synchronously, so a ``Load`` object the router has not
seen before includes everything sent until then and resets that instance's count. The
HTTP router's polls are asynchronous: it calls ``observe(k, load, since)`` with the
number of requests sent when the poll was issued, and only the sends after it stay
counted. ``count_sent=False`` turns this off (the raw policies, for ablations). Sends
never leave the count otherwise (a request that finishes before the next poll is counted
until that poll), which errs towards spreading load.

Every ``choose`` is O(instances) and allocates nothing but its result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import ClassVar, Iterable, Sequence

from fairbatch.scheduler.base import Load



class Router(ABC):
    name: ClassVar[str] = "abstract"
    uses_load: ClassVar[bool] = True   # False: the router never reads Load (no polling needed)
    # the Load fields the policy reads (None: any): a simulator may measure only those
    # (sim.loads), since a full load walks the instance's queues and running requests
    reads: ClassVar[frozenset[str] | None] = None
    # True: ``choose`` reads ``block_hashes`` (a host computes them only for such a router)
    reads_prefix: ClassVar[bool] = False

    def __init__(self, *, count_sent: bool = True, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.count_sent = bool(count_sent) and self.uses_load
        self.block_size = int(block_size)
        self._n = 0
        self._seen: list[Load | None] = []          # the Load object each count is relative to
        self._log: list[deque[tuple[int, int]]] = []  # per instance: (send number, prompt tokens)
        self.sent_reqs: list[int] = []
        self.sent_tokens: list[int] = []
        self.sent_blocks: list[int] = []
        self.num_sent = 0                             # sends so far, all instances

    # --- interface -------------------------------------------------------------------------
    def choose(self, prompt_len: int, loads: Sequence[Load], candidates: Iterable[int] | None = None, *,
               block_hashes: Sequence[int] | None = None) -> int:
        """Index (into ``loads``) of the instance that gets a request of ``prompt_len``
        prompt tokens. ``candidates``: the indices allowed (e.g. the healthy backends);
        None: all. ``block_hashes``: the names of the prompt's full KV blocks, hash-chained
        (a name covers its whole prefix), ``block_size`` tokens each; only the ``prefix``
        router reads them. Records the send for the sent-since-poll accounting."""
        n = len(loads)
        if n == 0:
            raise ValueError("no instance to route to")
        if n != self._n:
            self._resize(n)
        cand: Sequence[int] = range(n) if candidates is None else list(candidates)
        if not cand:
            raise ValueError("no candidate instance to route to")
        if self.count_sent:
            seen = self._seen
            for i in cand:
                ld = loads[i]
                if ld is not seen[i]:   # measured after every send so far (the simulator's case)
                    self._reset(i, ld, self.num_sent)
        self._prepare(block_hashes)
        k = self._pick(prompt_len, loads, cand)
        self.record_send(k, self._charge(k, prompt_len))
        return k

    def observe(self, k: int, load: Load, since: int) -> None:
        """Instance ``k``'s fresh ``load`` was requested when ``since`` sends had been made
        (``num_sent`` then): it includes those, not the later ones."""
        if k >= self._n:
            self._resize(k + 1)
        self._reset(k, load, since)

    def record_send(self, k: int, prompt_len: int) -> None:
        if not self.count_sent:
            self.num_sent += 1
            return
        self.num_sent += 1
        self._log[k].append((self.num_sent, prompt_len))
        self.sent_reqs[k] += 1
        self.sent_tokens[k] += prompt_len
        self.sent_blocks[k] += self._blocks(prompt_len)

    def _prepare(self, block_hashes: Sequence[int] | None) -> None:
        """Before ``_pick``: a router that reads the prompt's block names keeps them."""

    def _charge(self, k: int, prompt_len: int) -> int:
        """The prompt tokens a send to ``k`` counts in ``sent_tokens`` (all of them, unless
        the router knows part of the prompt is cached there)."""
        return prompt_len

    @abstractmethod
    def _pick(self, prompt_len: int, loads: Sequence[Load], cand: Sequence[int]) -> int:
        """The policy: an index from ``cand``; ``self.sent_*`` hold the sends not in ``loads``."""

    # --- accounting ------------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-(tokens + 1) // self.block_size)   # the prompt plus its first output token

    def _resize(self, n: int) -> None:
        grow = n - self._n
        if grow > 0:
            self._seen += [None] * grow
            self._log += [deque() for _ in range(grow)]
            self.sent_reqs += [0] * grow
            self.sent_tokens += [0] * grow
            self.sent_blocks += [0] * grow
        else:
            del self._seen[n:], self._log[n:], self.sent_reqs[n:], self.sent_tokens[n:], self.sent_blocks[n:]
        self._n = n

    def _reset(self, k: int, load: Load, since: int) -> None:
        self._seen[k] = load
        log = self._log[k]
        while log and log[0][0] <= since:
            _, p = log.popleft()
            self.sent_reqs[k] -= 1
            self.sent_tokens[k] -= p
            self.sent_blocks[k] -= self._blocks(p)
