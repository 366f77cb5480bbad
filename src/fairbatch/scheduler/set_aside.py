"""Moore-Hodgson over a queue of prompts: which to serve first so that most make their
first-token deadline.

Taken in priority order at a given prefill rate, whenever a prompt would finish past its
deadline the longest prompt so far is set aside. With exact processing times this
maximises the number of on-time jobs on one machine (Moore-Hodgson, 1968); the set-aside
ones are served after the others, not dropped. FairBatching recomputes it every step, so a
prompt set aside in a burst comes back as soon as it fits again (``admission_order``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from fairbatch.request import Request


def moore_hodgson(prompts: Sequence[Request], now: float, busy_until: float, rate: float,
                  key: Callable[[Request], float]) -> list[Request]:
    """``prompts`` in priority order, reordered: the ones kept, in that order, then the
    set-aside ones by ``key``. ``busy_until`` is the time of the work already ahead of them
    (seconds from ``now``), ``rate`` the prefill rate in tokens per second."""
    t = busy_until
    kept: list[tuple[int, int, Request]] = []     # max-heap by remaining tokens
    aside: list[Request] = []
    for i, r in enumerate(prompts):
        rem = r.prompt_len - r.num_computed
        t += rem / rate
        heapq.heappush(kept, (-rem, -i, r))       # ties: the later in order goes
        if now + t > r.deadline:
            neg, _, big = heapq.heappop(kept)
            t += neg / rate
            aside.append(big)
    if not aside:
        return list(prompts)
    out = {id(r) for r in aside}
    return [r for r in prompts if id(r) not in out] + sorted(aside, key=key)


def admission_order(waiting: Sequence[Request], partials: Sequence[Request], now: float,
                    prefill_rate: float, decode_share: float,
                    key: Callable[[Request], float]) -> list[Request] | None:
    """The order in which FairBatching admits ``waiting`` (sorted by ``key``): streams
    preempted for KV first, then prompts already past their deadline, then the rest through
    ``moore_hodgson`` at the prefill rate the decodes leave (``decode_share`` of each step is
    theirs). None when there is nothing to order (fewer than two prompts)."""
    # streams preempted for KV resume first; the set-aside orders prompts only
    resumed = [r for r in waiting if r.generated]
    cands = [r for r in waiting if not r.generated]
    # prompts past their deadline here were promoted back (late_deadline_factor): their
    # turn has come, so they go first and are never set aside
    promoted = [r for r in cands if r.deadline <= now]
    if promoted:
        cands = [r for r in cands if r.deadline > now]
    if len(cands) < 2 and not promoted and not resumed:
        return None
    # the rate the decodes leave, not this step's: the chunks already in it (partial
    # prefills) are counted as work ahead of the waiting prompts
    rate = prefill_rate * max(0.1, 1.0 - decode_share)
    ahead = sum(r.prompt_len - r.num_computed for r in partials if not r.relegated) / rate
    return resumed + promoted + moore_hodgson(cands, now, ahead, rate, key)
