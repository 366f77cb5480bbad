"""Prefill-first batching (vLLM V0 / Orca order), an extra baseline.

Waiting prompts are admitted FCFS and prefilled whole (as many as fit the token budget)
in steps of their own; only when no prompt can be admitted do running requests decode.
Best throughput for new prompts, worst stalls for running ones.
"""

from __future__ import annotations

from fairbatch.plan import StepPlan
from fairbatch.scheduler.base import Scheduler, register_policy


@register_policy
class PrefillFirstScheduler(Scheduler):
    name = "prefill-first"
    reads = frozenset()      # the shared options only

    def _form(self, now: float) -> StepPlan:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        plan = StepPlan(token_budget=budget)
        for waiting in (self.waiting, self.relegated):   # on-time prompts first
            while waiting and len(self.running) < cfg.max_num_seqs:
                req = waiting[0]
                self.take_cached_prefix(req)
                k = req.prompt_len + req.generated - req.num_computed
                # A prompt larger than the whole budget still runs, alone, or it would never start.
                if k > budget and not (plan.is_empty and k > cfg.max_num_batched_tokens):
                    break
                if not self._grow(req, req.num_computed + k):
                    break
                waiting.popleft()
                self._admit(req)
                plan.add(req, k)
                budget -= k
            else:
                continue
            break   # the budget or the cache is full: nothing behind it fits either
        if not plan.is_empty:
            return plan
        # Decode step: every running request, preempting the newest when KV runs out.
        running = self.running
        i = 0
        while i < len(running):
            req = running[i]
            c = req.num_computed
            k = req.prompt_len + req.generated - c
            if not self._make_room(req, c + k, plan):
                continue   # req itself was preempted: running[i] is the next one
            plan.add(req, k)
            i += 1
        return plan
