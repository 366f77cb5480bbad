"""The four routing policies, each a ``Router`` that only picks (``_pick``): the base
class does the sent-since-poll accounting (``base.py``).

- ``round_robin``: the next instance in turn, never reads a load;
- ``least_requests``: fewest running + waiting (vLLM's data-parallel balancing);
- ``llumnix``: most free KV blocks per request (Llumnix's dispatch freeness);
- ``admission``: FairBatching's admission budget, largest that covers the prompt.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from fairbatch.routing.base import Router
from fairbatch.scheduler.base import Load

_INF = float("inf")


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
