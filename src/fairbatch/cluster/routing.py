"""Routing policies: which instance gets a new request.

Shared by the cluster simulator (``fairbatch.sim.loop``) and the HTTP router
(``fairbatch.cluster.proxy``). A router sees each instance's ``Load`` — possibly stale:
a real router polls, the simulator refreshes at most every ``load_interval`` seconds —
and the new request's prompt length.

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

import math
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from fairbatch.scheduler.base import Load

_INF = float("inf")


class Router(ABC):
    name: ClassVar[str] = "abstract"
    uses_load: ClassVar[bool] = True   # False: the router never reads Load (no polling needed)
    # the Load fields the policy reads (None: any): a simulator may measure only those
    # (sim.loads), since a full load walks the instance's queues and running requests
    reads: ClassVar[frozenset[str] | None] = None

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
    def choose(self, prompt_len: int, loads: Sequence[Load], candidates: Iterable[int] | None = None) -> int:
        """Index (into ``loads``) of the instance that gets a request of ``prompt_len``
        prompt tokens. ``candidates``: the indices allowed (e.g. the healthy backends);
        None: all. Records the send for the sent-since-poll accounting."""
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
        k = self._pick(prompt_len, loads, cand)
        self.record_send(k, prompt_len)
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


class RoundRobinRouter(Router):
    name = "round_robin"
    uses_load = False
    reads = frozenset()

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._next = 0

    def _pick(self, prompt_len: int, loads: Sequence[Load], cand: Sequence[int]) -> int:
        n = len(loads)
        allowed = set(cand) if len(cand) < n else None
        for step in range(n):
            i = (self._next + step) % n
            if allowed is None or i in allowed:
                self._next = i + 1
                return i
        raise AssertionError("unreachable")


class LeastRequestsRouter(Router):
    """vLLM data-parallel style: fewest running + waiting requests (+ sent since the poll)."""

    name = "least_requests"
    reads = frozenset({"running", "waiting"})

    def _pick(self, prompt_len: int, loads: Sequence[Load], cand: Sequence[int]) -> int:
        sent = self.sent_reqs if self.count_sent else None
        best, best_n = -1, _INF
        for i in cand:
            ld = loads[i]
            n = ld.running + ld.waiting + (sent[i] if sent else 0)
            if n < best_n:
                best, best_n = i, n
        return best


class LlumnixRouter(Router):
    """Llumnix's dispatch freeness (its ``remaining_steps`` load, negated): free KV blocks,
    less the blocks queued prompts will need, per queued-or-running request; highest wins,
    an empty instance is infinitely free."""

    name = "llumnix"
    reads = frozenset({"running", "waiting", "free_blocks", "queued_prefill_tokens"})

    def freeness(self, ld: Load, i: int) -> float:
        bs = self.block_size
        free = ld.free_blocks - -(-ld.queued_prefill_tokens // bs)
        n = ld.running + ld.waiting
        if self.count_sent:
            free -= self.sent_blocks[i]
            n += self.sent_reqs[i]
        return free / n if n else _INF

    def _pick(self, prompt_len: int, loads: Sequence[Load], cand: Sequence[int]) -> int:
        best, best_f = -1, -_INF
        for i in cand:
            f = self.freeness(loads[i], i)
            if f > best_f or best < 0:
                best, best_f = i, f
        return best


class AdmissionRouter(Router):
    """FairBatching's admission budget: among the instances whose budget covers the prompt,
    the one with the largest budget; when none does, the least over-committed one — the
    smallest shortfall ``prompt_len - budget``, i.e. the one whose queue starts the prompt
    soonest. Budgets are in prompt tokens, less the tokens sent since the last poll."""

    name = "admission"
    reads = frozenset({"admission_budget"})

    def budget(self, ld: Load, i: int) -> float:
        b = ld.admission_budget
        if self.count_sent:
            b -= self.sent_tokens[i]
        return b

    def _pick(self, prompt_len: int, loads: Sequence[Load], cand: Sequence[int]) -> int:
        best_fit, best_fit_b = -1, -_INF       # largest budget that covers the prompt
        least_over, least_short = -1, _INF     # smallest shortfall
        for i in cand:
            b = self.budget(loads[i], i)
            if math.isnan(b):                   # an instance that reports no estimate
                b = -_INF
            if b >= prompt_len:
                if b > best_fit_b:
                    best_fit, best_fit_b = i, b
            elif best_fit < 0:
                short = prompt_len - b
                if short < least_short or least_over < 0:
                    least_over, least_short = i, short
        return best_fit if best_fit >= 0 else least_over


_ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (RoundRobinRouter, LeastRequestsRouter, LlumnixRouter, AdmissionRouter)
}
_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def router_names() -> list[str]:
    return list(_ROUTERS)


def parse_router_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> (name, options); options: ``count_sent`` (bool),
    ``block_size`` (int). E.g. ``least_requests:count_sent=false``."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name not in _ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(_ROUTERS)}")
    opts: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        value = value.strip().lower()
        if not sep:
            raise ValueError(f"bad router option {item!r} in {spec!r}: expected KEY=VALUE")
        if key == "count_sent":
            if value not in _BOOL:
                raise ValueError(f"bad router option {item!r}: count_sent is true or false")
            opts[key] = _BOOL[value]
        elif key == "block_size":
            try:
                opts[key] = int(value)
            except ValueError:
                raise ValueError(f"bad router option {item!r}: block_size is an integer") from None
            if opts[key] < 1:
                raise ValueError(f"bad router option {item!r}: block_size must be >= 1")
        else:
            raise ValueError(f"unknown router option {key!r} in {spec!r} (count_sent, block_size)")
    return name, opts


def make_router(spec: str, **options: Any) -> Router:
    """A router from ``NAME[:KEY=VALUE,...]`` (see ``parse_router_spec``); keyword options
    override those in the spec."""
    name, opts = parse_router_spec(spec)
    opts.update(options)
    return _ROUTERS[name](**opts)


# --- loads over HTTP ---------------------------------------------------------------------------
_LOAD_FIELDS = ("running", "waiting", "kv_usage", "free_blocks", "num_blocks", "queued_prefill_tokens",
                "admission_budget", "time")


def load_from_json(obj: Mapping[str, Any], *, time: float = 0.0) -> Load:
    """A ``Load`` from a backend's ``GET /load`` JSON (``time`` is set to the caller's clock:
    a backend's own clock means nothing to the router). Raises ValueError if a field is
    missing or not a number."""
    vals: dict[str, Any] = {}
    for f in _LOAD_FIELDS[:-1]:
        v = obj.get(f)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"/load answer lacks a numeric {f!r}")
        vals[f] = v
    for f in ("running", "waiting", "free_blocks", "num_blocks", "queued_prefill_tokens"):
        vals[f] = int(vals[f])
    vals["kv_usage"] = float(vals["kv_usage"])
    b = float(vals["admission_budget"])
    vals["admission_budget"] = b if not math.isnan(b) else -_INF
    return Load(**vals, time=time)


def empty_load(time: float = 0.0, *, budget: float = _INF) -> Load:
    """The load of an instance known to be idle, or of one that cannot say (a backend
    without ``/load``): the router's own sent-since-poll counts then carry the policy."""
    return Load(running=0, waiting=0, kv_usage=0.0, free_blocks=0, num_blocks=0, queued_prefill_tokens=0,
                admission_budget=budget, time=time)
