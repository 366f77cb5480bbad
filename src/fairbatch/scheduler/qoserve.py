"""QoServe (Niyama, ASPLOS'26): a baseline that sizes each step's prefill by the least
decode slack and orders prompts by a hybrid of deadline and remaining work.

Each step, as the paper and its public scheduler describe it:

1. **Decodes first.** Every running decode gets its token, least slack (earliest next
   deadline) first. The least slack ``s`` among them sets the step's time budget
   ``T = s / qoserve_safety_factor``: a step whose predicted time times the safety factor
   (1.2) fits ``s`` cannot make that decode late even if it overruns the prediction by 20 %.
2. **Dynamic chunking.** Prefill chunks fill the step with the largest chunk whose
   predicted step time stays within ``T`` (the step-time model is our latency model),
   capped so the step holds at most ``qoserve_max_step_tokens`` (2,552) tokens, decodes
   included, and floored so it may always hold ``qoserve_min_step_tokens`` (128): with no
   slack left a small chunk still runs, as in the original, so prompts keep moving. With no
   decodes running the cap alone applies.
3. **Hybrid prioritization.** Prefills (running partial ones and waiting prompts alike) are
   served in order of ``deadline + qoserve_priority_weight * remaining tokens``
   (0.008 s per token): earliest deadline first, nudged towards shortest remaining prefill,
   so a short prompt overtakes a long one whose deadline is only slightly earlier. Several
   prompts share a step in that order until the budget runs out.
4. **Eager relegation** is this repository's shared ``late`` mechanism (late.py): with
   ``late=relegate`` a prompt that can no longer make its TTFT is put behind every prompt
   that can, as the original puts a prompt it predicts will miss behind the others.

Where the original is silent or tied to its own engine, we chose:

- Every request's own SLO sets its deadlines (``Request.deadline``, paced at its TPOT); the
  original's fixed per-tier TBT maps onto that.
- The chunk is the largest that fits, found by the latency model per prompt instead of a
  bisection over a fixed grid of step sizes, rounded down to ``chunk_align`` where the
  model cut it (at least ``min_chunk`` unless it ends the prompt); each prompt's chunk is
  priced with its own cached context and everything already in the step (chunk.py).
- The original never preempts (it asserts there is memory). We preempt (recompute) when KV
  runs out: the running request outside this step that ranks last in QoServe's own order
  (relegated last, then by the hybrid key), and only if it ranks after the request that
  needs the blocks, a strict order so that the first-ranked request can always run
  (preempt.py).
  Admissions never preempt, and none happen in a step that preempted (vLLM's rule). The
  original's smaller step grid under memory pressure is therefore not needed and omitted.
- The step budget is also divided by the moving average of measured over predicted step
  time while that is above 1 (FairBatching's overrun correction, step_budget.py; a no-op
  in an exact simulator). The original trusts its fixed safety factor; on a served GPU
  whose steps ran a few percent over the model, FairBatching lost its lead without this
  correction, so a fair comparison gives it to both. FairBatching's other correction,
  shorter steps under KV pressure, was tried here too and left out: it cost QoServe 4 %
  of capacity at the default SLOs of the conversation trace and gained 1 % with loose
  ones (docs/ALGORITHM.md); QoServe's own 2,552-token step cap does that job.
- Decodes of requests whose first token came late (``late`` other than ``serve``) run after
  the prefills, within ``T``, and do not set ``T``; once a token of theirs is
  ``failed_decode_gap`` TPOTs old they join the on-time decodes, so they never starve.
  Relegated prompts, partial or waiting, come after every on-time prompt.
"""

from __future__ import annotations

from operator import attrgetter

from fairbatch.plan import StepPlan
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.base import Scheduler, register_policy
from fairbatch.scheduler.chunk import qoserve_chunk
from fairbatch.scheduler.late import Late, last_token_time
from fairbatch.scheduler.preempt import reserve_by_rank
from fairbatch.scheduler.prompt_heap import PromptHeap
from fairbatch.scheduler.step_budget import StepBudget

_INF = float("inf")
_RUNNING = RequestState.RUNNING
_by_deadline = attrgetter("deadline")


def _first(pair: tuple) -> tuple:
    return pair[0]


@register_policy
class QoServeScheduler(Scheduler):
    name = "qoserve"
    reads = frozenset({"qoserve_safety_factor", "qoserve_priority_weight", "qoserve_min_step_tokens",
                       "qoserve_max_step_tokens", "min_chunk", "chunk_align", "failed_decode_gap", "step_overrun_gain"})

    def __init__(self, config, allocator, latency_model) -> None:
        super().__init__(config, allocator, latency_model)
        # waiting prompts by (relegated, hybrid key) (prompt_heap.py; relegated here are
        # preempted late decodes: relegated prompts wait in self.relegated)
        self._heap = PromptHeap(self._heap_key)
        self._budget = StepBudget(config, allocator)

    # --- order -----------------------------------------------------------------------------
    def _priority(self, req: Request) -> float:
        """Hybrid key: the next token's deadline, pushed back by the work left before it."""
        pending = req.prompt_len + req.generated - req.num_computed
        return req.deadline + self.config.qoserve_priority_weight * pending

    def _rank(self, req: Request) -> tuple:
        """Preemption order (preempt.py): relegated last, then the hybrid key, then admission."""
        return req.relegated, self._priority(req), req.admitted_at

    def _heap_key(self, req: Request) -> tuple[int, float]:
        return (1 if req.relegated else 0), self._priority(req)

    def _enqueue(self, req: Request) -> None:
        super()._enqueue(req)
        self._heap.push(req)

    def _requeue_front(self, req: Request) -> None:
        super()._requeue_front(req)
        self._heap.push(req)

    def _work_left_changed(self, req: Request) -> None:
        super()._work_left_changed(req)
        self._heap.rekey(req)   # its hybrid key read num_computed

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        super()._preempt(req, plan)
        if not (req.relegated and not req.generated):   # those went to self.relegated
            self._heap.push(req)

    def observe_step(self, predicted: float | None, measured: float) -> None:
        self._budget.observe(predicted, measured)

    # --- batch formation -------------------------------------------------------------------
    def _form(self, now: float) -> StepPlan:
        cfg = self.config
        relegate = self.late is not Late.SERVE
        gap = cfg.failed_decode_gap

        decodes: list[Request] = []
        overdue: list[Request] = []     # relegated decodes owed a token (never starved)
        failed: list[Request] = []      # relegated decodes: best effort, after the prefills
        partials: list[Request] = []
        min_deadline = _INF
        min_pace = _INF
        for req in self.running:        # the hot path: one pass over the running requests
            g = req.generated
            if g and req.prompt_len + g - req.num_computed == 1:
                if relegate and req.relegated:
                    if req.token_times[-1] >= now - gap * req.pace:
                        failed.append(req)
                    else:
                        overdue.append(req)
                    continue
                decodes.append(req)
                if req.deadline < min_deadline:
                    min_deadline = req.deadline
                if req.pace < min_pace:
                    min_pace = req.pace
            else:
                partials.append(req)

        # The least slack among on-time decodes bounds the step; a request already past its
        # SLO does not, or one lost request would shrink every chunk to the floor.
        T = (min_deadline - now) / cfg.qoserve_safety_factor if decodes else _INF
        if decodes:     # FairBatching's correction for steps that overrun the model (step_budget.py)
            T = self._budget.after_overrun(T)
        cap = cfg.max_num_batched_tokens
        step_cap = min(cfg.qoserve_max_step_tokens, cap)
        plan = StepPlan(token_budget=step_cap, time_budget=T if decodes else None)

        if decodes:
            decodes.sort(key=_by_deadline)
            self._add_decodes(decodes, plan, _INF, cap)
        if overdue:
            overdue.sort(key=last_token_time)
            self._add_decodes(overdue, plan, _INF, cap)
        self._add_prefills(partials, T, step_cap, plan)
        if failed:
            failed.sort(key=last_token_time)
            self._add_decodes(failed, plan, T, cap)

        plan.predicted_time = self.latency.predict(plan.features) if plan.chunks else 0.0
        return plan

    def _add_prefills(self, partials: list[Request], T: float, step_cap: int, plan: StepPlan) -> None:
        """Running partial prefills and waiting prompts in one hybrid order (on-time before
        relegated), each given the largest chunk that fits; stops at the first that gets
        none, so no prompt is overtaken by a lower-priority one that happens to fit."""
        parts = sorted(((self._heap_key(r), r) for r in partials), key=_first) if partials else []
        heap = self._heap
        max_seqs = self.config.max_num_seqs
        i, n = 0, len(parts)
        admit = True
        while True:
            top = heap.head_entry() if admit else None
            if i < n and (top is None or parts[i][0] <= top[0]):
                req = parts[i][1]
                i += 1
                if req.state is not _RUNNING:
                    continue                # preempted earlier in this step
                k = qoserve_chunk(self.latency, self.config, req, plan, T, step_cap)
                if k == 0:
                    return
                if self._reserve(req, req.num_computed + k, plan):
                    plan.add(req, k)
                continue
            if top is None:
                break
            req = top[2]
            if plan.preempted or len(self.running) >= max_seqs:
                admit = False               # like vLLM: no admissions in a step that preempted
                continue
            self.take_cached_prefix(req)
            k = qoserve_chunk(self.latency, self.config, req, plan, T, step_cap)
            if k == 0:
                return
            if not self._grow(req, req.num_computed + k):
                admit = False               # admissions never preempt; partials may still run
                continue
            heap.discard(req)               # its entries go stale (it may have been pushed again)
            self.waiting.remove(req)
            self._admit(req)
            plan.add(req, k)

        # relegated prompts (late.py), in the order they were relegated, after everyone else
        relegated = self.relegated
        while admit and relegated and not plan.preempted and len(self.running) < max_seqs:
            req = relegated[0]
            self.take_cached_prefix(req)
            k = qoserve_chunk(self.latency, self.config, req, plan, T, step_cap)
            if k == 0 or not self._grow(req, req.num_computed + k):
                return
            relegated.popleft()
            self._admit(req)
            plan.add(req, k)

    def _add_decodes(self, reqs: list[Request], plan: StepPlan, T: float, cap: int) -> None:
        """The longest prefix of ``reqs`` that fits ``T`` (``inf``: all of them) and ``cap``."""
        self._add_decode_prefix(reqs, plan, T, cap, lambda r, n: self._reserve(r, n, plan))

    def _reserve(self, req: Request, num_tokens: int, plan: StepPlan) -> bool:
        return reserve_by_rank(self, req, num_tokens, plan, self._rank)
