"""Preemption by rank, for the deadline-driven policies (FairBatching, QoServe).

When a request needs KV blocks and the cache is full, the running request outside this
step that ranks last is preempted (recompute), and only if it ranks after the request that
needs the blocks. Each policy's rank ends with the admission order, so it is a strict
order: the first-ranked request can always get its blocks, and the instance never stalls
with every request waiting for another's. (The FCFS policies preempt the newest request
instead: ``Scheduler._make_room``.)
"""

from __future__ import annotations

from collections.abc import Callable

from fairbatch.plan import StepPlan
from fairbatch.request import Request


def reserve_by_rank(sched, req: Request, num_tokens: int, plan: StepPlan,
                    rank: Callable[[Request], tuple]) -> bool:
    """Make ``req``'s KV hold ``num_tokens`` tokens, preempting as above while the cache is
    short; False when no running request ranks after ``req``."""
    while not sched._grow(req, num_tokens):
        in_plan = {id(r) for r, _ in plan.chunks}
        best = rank(req)
        victim = None
        for r in sched.running:
            if r is req or id(r) in in_plan:
                continue
            key = rank(r)
            if key > best:
                best, victim = key, r
        if victim is None:
            return False
        sched._preempt(victim, plan)
    return True
