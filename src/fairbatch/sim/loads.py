"""The router's view of the instances' loads in the simulator, kept at O(1) per arrival.

An instance's ``Load`` changes only when the instance does: a request added, a step begun
(admissions, KV allocation) or ended (tokens computed, requests finished). None of the
loads reads the clock (``Scheduler.load`` and every ``admission_budget`` depend on the
scheduler's state alone), so the loop marks an instance *dirty* at each of those events
and a load is recomputed only when the router next reads a dirty instance: at most once
per step or arrival of that instance, whatever the number of instances. The router's
view of each instance is then a list patched in place, not rebuilt per arrival.

Staleness (``interval`` > 0) is kept exactly as a polling router sees it: an instance's
view is refreshed at the first arrival ``interval`` or more seconds after its last
refresh (refreshes in time order, so a deque holds them), and only then does a dirty
instance's new load become visible.

Only what the router reads is measured (``Router.reads``): a router of request counts
(``least_requests``) gets them in O(1), without the walk over queues and running requests
that queued prompt tokens and the admission budget need; ``llumnix`` gets the queued
tokens without the budget. Fields a router does not read are marked unmeasured
(``queued_prefill_tokens`` -1, ``admission_budget`` NaN).

A ``Load`` object is reused while its instance is unchanged. The routers' sent-since-poll
accounting treats a Load object it has not seen as including every send so far; a reused
object is the same measurement, and no send went to that instance since it was made (a
send, even one the instance refused, marks it dirty), so the routers decide exactly as
with a fresh object per arrival (tests/test_sim_scale.py checks decision by decision).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from fairbatch.instance import Instance
from fairbatch.scheduler.base import Load

# fields the scheduler knows without walking its requests
_COUNTS = frozenset({"running", "waiting", "kv_usage", "free_blocks", "num_blocks"})


def count_load(inst: Instance, now: float) -> Load:
    """The O(1) part of ``Scheduler.load``; the rest marked unmeasured (-1, NaN)."""
    s = inst.scheduler
    a = s.allocator
    return Load(running=len(s.running), waiting=s.num_waiting, kv_usage=a.usage, free_blocks=a.num_free,
                num_blocks=a.num_blocks, queued_prefill_tokens=-1, admission_budget=float("nan"), time=now)


def queue_load(inst: Instance, now: float) -> Load:
    """``count_load`` and the queued prompt tokens (``llumnix``), without the admission
    budget's walk over the running decodes."""
    ld = count_load(inst, now)
    ld.queued_prefill_tokens = inst.scheduler.queued_prefill_tokens()
    return ld


def full_load(inst: Instance, now: float) -> Load:
    return inst.load(now)


def measure_for(reads: frozenset[str] | None):
    """The cheapest measurement that has every field in ``reads`` (None: all)."""
    if reads is not None and reads <= _COUNTS:
        return count_load
    if reads is not None and reads <= _COUNTS | {"queued_prefill_tokens"}:
        return queue_load
    return full_load


class LoadView:
    """``view``: each instance's load as the router holds it; ``refresh(now)`` before
    each routing decision, ``mark(k)`` whenever instance ``k`` changed."""

    __slots__ = ("instances", "interval", "view", "_dirty", "_is_dirty", "_due", "_current", "_measure")

    def __init__(self, instances: Sequence[Instance], interval: float,
                 reads: frozenset[str] | None = None) -> None:
        """``reads``: the Load fields the router reads (None: all of them)."""
        self.instances = instances
        self.interval = interval
        self._measure = measure_for(reads)
        n = len(instances)
        self.view: list[Load | None] = [None] * n        # what the router reads
        self._current: list[Load | None] = [None] * n    # the latest load computed
        self._is_dirty = [True] * n
        self._dirty: list[int] = list(range(n))          # changed since their last load
        self._due: deque[tuple[float, int]] = deque()    # (last refresh time, k), in time order

    def mark(self, k: int) -> None:
        if not self._is_dirty[k]:
            self._is_dirty[k] = True
            self._dirty.append(k)

    def _load(self, k: int, now: float) -> Load:
        if self._is_dirty[k]:
            self._is_dirty[k] = False
            ld = self._current[k] = self._measure(self.instances[k], now)
            return ld
        return self._current[k]  # type: ignore[return-value]

    def refresh(self, now: float) -> list[Load]:
        view = self.view
        if self.interval <= 0.0:
            # always fresh: only the changed instances need a new load
            dirty = self._dirty
            if dirty:
                instances, current, is_dirty, measure = self.instances, self._current, self._is_dirty, self._measure
                for k in dirty:
                    is_dirty[k] = False
                    view[k] = current[k] = measure(instances[k], now)
                dirty.clear()
            return view  # type: ignore[return-value]
        due = self._due
        if view[0] is None:                       # first decision: every instance is read
            for k in range(len(view)):
                view[k] = self._load(k, now)
                due.append((now, k))
            self._dirty.clear()
            return view  # type: ignore[return-value]
        interval = self.interval
        while due and now - due[0][0] >= interval:   # the polling router's own test, to the bit
            _, k = due.popleft()
            view[k] = self._load(k, now)
            due.append((now, k))
        # _dirty only de-duplicates marks here; the refresh order above decides what is read
        self._dirty.clear()
        return view  # type: ignore[return-value]
