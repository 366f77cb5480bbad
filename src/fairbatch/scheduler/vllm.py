"""vLLM V1's scheduling order (vLLM 0.33 ``Scheduler.schedule``), without prefix caching
or speculative decoding.

Running requests first, in admission order, each given everything it has pending (a
decode: 1 token; a partial prefill: the rest of its prompt) within the step's token
budget. When KV runs out, the newest running request is preempted (recompute), possibly
the one being scheduled. Then, only if nobody was preempted this step, waiting requests
are admitted FCFS and chunked into the leftover budget.

``vllm_priority.py`` reuses this step with its own queue order and victim (``_victim``);
a victim already in the step gives its tokens back, as in vLLM. A step left empty by
preemptions (the request being scheduled was its own victim) is formed again at once, as
vLLM's next ``schedule()`` call would: an empty plan would idle the instance.
"""

from __future__ import annotations

from fairbatch.plan import StepPlan, attention_pairs
from fairbatch.request import RequestState
from fairbatch.scheduler.base import Scheduler, register_policy


@register_policy
class VLLMScheduler(Scheduler):
    name = "vllm"
    reads = frozenset()      # the shared options only: max_num_batched_tokens is its budget

    def _form(self, now: float) -> StepPlan:
        plan = StepPlan(token_budget=self.config.max_num_batched_tokens)
        while self._schedule_pass(plan) and not plan.chunks:
            # Everyone it reached was preempted (vllm-priority: the request being
            # scheduled was the lowest-priority one). vLLM runs the empty step and
            # schedules again at once; so do we, in the same plan.
            pass
        return plan

    def _schedule_pass(self, plan: StepPlan) -> bool:
        """One call of vLLM's ``schedule()`` into ``plan``; True if it preempted."""
        budget = plan.token_budget
        running = self.running
        preempted_before = len(plan.preempted)

        chunks = plan.chunks
        seqs = new = ctx = 0
        pairs = 0.0
        i = 0
        late: list = []     # relegated partial prefills: after the prompts on time (late.py)
        while i < len(running) and budget > 0:
            req = running[i]
            if req.relegated and not req.generated:
                late.append(req)
                i += 1
                continue
            c = req.num_computed
            k = req.prompt_len + req.generated - c
            if k > budget:
                k = budget
            if k <= 0:
                i += 1
                continue
            if c + k > req.kv_slots:
                f = plan.features
                placed, preempted = f.new_tokens, len(plan.preempted)
                if not self._make_room(req, c + k, plan):
                    break
                if len(plan.preempted) != preempted:
                    # vllm-priority's victim may be placed already: its tokens came back
                    # (out of plan.features) and req moved up the list
                    budget += placed - f.new_tokens
                    i = running.index(req)
            # plan.add, with the features summed once below: this loop runs for every
            # running request each step; plan.add here made benchmarks/sim/sim_speed.py
            # 8 % slower under this policy (3.45 s vs 3.2 s)
            chunks.append((req, k))
            seqs += 1
            new += k
            ctx += c + k
            pairs += attention_pairs(c, k)
            budget -= k
            i += 1
        f = plan.features
        f.num_seqs += seqs
        f.new_tokens += new
        f.context_tokens += ctx
        f.attention_pairs += pairs

        # vLLM: no admissions in a step that had to preempt
        admit = len(plan.preempted) == preempted_before
        late = [r for r in late if r.state is RequestState.RUNNING]   # not preempted meanwhile
        self._admit_fcfs(plan, budget, late, admit=admit)
        return not admit
