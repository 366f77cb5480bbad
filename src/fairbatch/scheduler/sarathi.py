"""Sarathi-Serve stall-free batching.

Every step has a fixed token budget (``chunk_size``). It is filled with every running
decode (one token each), then partial prefills, then new prompts FCFS, chunked to the
budget's remainder. When KV runs out, the most recently admitted request is preempted.

With no ``chunk_size`` given, the budget follows Sarathi-Serve's own recipe: the largest
token count whose predicted step time still meets the TPOT SLO, so the baseline is as
strong as its authors would tune it.
"""

from __future__ import annotations

from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepFeatures, StepPlan
from fairbatch.scheduler.base import Scheduler, SchedulerConfig, register_policy


def sarathi_token_budget(model: LatencyModel, tpot: float, context: int = 1024, align: int = 16) -> int:
    """Largest multiple of ``align`` tokens whose step (one chunk over ``context`` cached
    tokens) is predicted to finish within ``tpot``; at least ``align``."""
    n = model.max_chunk(StepFeatures(), context, 1 << 20, tpot)
    return max(align, n // align * align)


@register_policy
class SarathiScheduler(Scheduler):
    name = "sarathi"
    reads = frozenset({"chunk_size", "chunk_recipe_tpot", "chunk_recipe_context", "chunk_align"})

    def __init__(self, config: SchedulerConfig, allocator, latency_model) -> None:
        super().__init__(config, allocator, latency_model)
        self.latency_model_changed()

    def latency_model_changed(self) -> None:
        cfg = self.config
        budget = cfg.chunk_size or sarathi_token_budget(self.latency, cfg.chunk_recipe_tpot or cfg.tpot_slo,
                                                        cfg.chunk_recipe_context, cfg.chunk_align)
        self.token_budget = min(budget, cfg.max_num_batched_tokens)

    def _form(self, now: float) -> StepPlan:
        budget = self.token_budget
        plan = StepPlan(token_budget=budget)
        running = self.running

        # 1) decodes, oldest first; preempt the newest request when KV is short
        prefills = []
        chunks = plan.chunks
        ctx = 0
        i = 0
        while i < len(running):
            req = running[i]
            c = req.num_computed
            if req.prompt_len + req.generated - c != 1 or req.generated == 0:
                prefills.append(req)
                i += 1
                continue
            if budget <= 0:
                break
            if c + 1 > req.kv_slots and not self._make_room(req, c + 1, plan):
                break
            chunks.append((req, 1))       # plan.add, with the features summed once below
            ctx += c
            budget -= 1
            i += 1
        f = plan.features
        decodes = len(chunks)
        f.num_seqs += decodes
        f.new_tokens += decodes
        f.context_tokens += ctx + decodes
        f.attention_pairs += ctx + decodes    # attention_pairs(c, 1) == c + 1 each
        if i < len(running):   # budget ran out: the rest may still hold partial prefills
            prefills.extend(r for r in running[i:] if r.prompt_len + r.generated - r.num_computed > 1 or r.generated == 0)

        # 2) partial prefills (admission order), 3) new prompts FCFS; relegated partial
        # prefills after the prompts on time (late.py)
        late = []
        for req in prefills:
            if req.relegated and not req.generated:
                late.append(req)
                continue
            if budget <= 0:
                break
            c = req.num_computed
            k = min(req.prompt_len + req.generated - c, budget)
            if not self._grow(req, c + k):
                break
            plan.add(req, k)
            budget -= k
        # vLLM: no admissions in a step that had to preempt
        self._admit_fcfs(plan, budget, late, admit=not plan.preempted)
        return plan
