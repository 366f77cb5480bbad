"""Moore-Hodgson over a queue of prompts: which to serve first so that most make their
first-token deadline.

Taken in priority order at a given prefill rate, whenever a prompt would finish past its
deadline the longest prompt so far is set aside. With exact processing times this
maximises the number of on-time jobs on one machine (Moore-Hodgson, 1968); the set-aside
ones are served after the others, not dropped. FairBatching recomputes it every step, so a
prompt set aside in a burst comes back as soon as it fits again.
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
