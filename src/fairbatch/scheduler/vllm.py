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

    def _form(self, now: float) -> StepPlan:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        plan = StepPlan(token_budget=budget)
        running = self.running

        chunks = plan.chunks
        n = len(running)
        seqs = ctx = 0
        pairs = 0.0
        i = 0
        while i < n and budget > 0:
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
                victim = self._victim(i)
                self._preempt(victim, plan)
                n -= 1
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break
            chunks.append((req, k))       # plan.add, with the features summed once below
            seqs += 1
            ctx += c + k
            pairs += k * c + k * (k + 1) * 0.5
            budget -= k
            i += 1
        f = plan.features
        f.num_seqs += seqs
        f.new_tokens += plan.token_budget - budget
        f.context_tokens += ctx
        f.attention_pairs += pairs

        if not plan.preempted:   # vLLM: no admissions in a step that had to preempt
            self._admit_fcfs(plan, budget)
        return plan
