"""vLLM V1's scheduling order (vLLM 0.33 ``Scheduler.schedule``), without prefix caching
or speculative decoding.

Running requests first, in admission order, each given everything it has pending (a
decode: 1 token; a partial prefill: the rest of its prompt) within the step's token
budget. When KV runs out, the newest running request is preempted (recompute), possibly
the one being scheduled. Then, only if nobody was preempted this step, waiting requests
are admitted FCFS and chunked into the leftover budget.
"""

from __future__ import annotations

from fairbatch.plan import StepPlan
from fairbatch.scheduler.base import Scheduler, register_policy


@register_policy
class VLLMScheduler(Scheduler):
    name = "vllm"

    def schedule(self, now: float) -> StepPlan:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        plan = StepPlan(token_budget=budget)
        running = self.running

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed
            k = req.prompt_len + req.generated - c
            if k > budget:
                k = budget
            if k <= 0:
                i += 1
                continue
            scheduled = True
            while c + k > req.kv_slots and not self._grow(req, c + k):
                victim = running[-1]
                self._preempt(victim, plan)
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break
            plan.add(req, k)
            budget -= k
            i += 1

        if not plan.preempted:   # vLLM: no admissions in a step that had to preempt
            self._admit_fcfs(plan, budget)
        return plan
