"""FairBatching: slack-driven batch formation under a per-step *time* budget.

Every request has per-token deadlines (``Request.token_deadline``); ``slack`` is the time
left until its next one. Each step:

1. **Time budget** ``T = min slack of running decodes`` (so the step ends before the
   tightest deadline), clamped to ``[time_budget_min, time_budget_max]``; ``T_max`` with
   no decodes. (``time_budget_rule="max-slack-tpot"``: DESIGN.md's ``max(min slack, min
   tpot)``.)
2. **Formation** under ``T`` (predicted by the latency model, evaluated incrementally):
   (a) *urgent* decodes, those whose deadline falls before the step after this one could
   end (``slack < T + t_next``, ``t_next`` = the all-decodes step, at least ``T_min``; with
   ``urgency_horizon="tpot"``: ``slack < T + tpot``), by slack; always scheduled, even past
   ``T`` (the floor that
   keeps running requests on their envelope); (b) prefills, partial ones then waiting
   ones, each by slack, each given the largest chunk that keeps the step within ``T``
   (rounded down to ``chunk_align``, at least ``min_chunk`` unless it finishes the
   prompt); (c) the remaining decodes, by slack, while the step stays within ``T``.
   If nothing fits, one ``min_chunk`` prefill runs so the instance always progresses.
3. **Preemption** (recompute) when KV runs out: the running request with the most
   slack that is not in this step, and only if it has more slack than the one waiting
   for the blocks.
4. **Load estimate**: the admission budget, prompt tokens this instance can still start
   within a TTFT horizon given the compute its decodes need (``admission_budget``).

Waiting requests are kept in a heap keyed by their next deadline, which cannot change
while they wait, so selecting prefills by slack costs O(log n), not a sort of the queue.
"""

from __future__ import annotations

import heapq
from itertools import count

from fairbatch.plan import StepFeatures, StepPlan
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.base import Scheduler, register_policy

_INF = float("inf")


@register_policy
class FairBatchingScheduler(Scheduler):
    name = "fairbatching"

    def __init__(self, config, allocator, latency_model) -> None:
        super().__init__(config, allocator, latency_model)
        self._heap: list[tuple[float, int, Request]] = []   # (next deadline, seq, request)
        self._seq = count()
        self._step_now = 0.0
        # Prefill throughput for the load estimate: tokens per second of T_max-long
        # pure-prefill steps, per the latency model.
        n = latency_model.max_tokens_in(config.time_budget_max)
        self._prefill_rate = n / config.time_budget_max if n > 0 else 0.0

    # --- waiting heap ----------------------------------------------------------------------
    def add(self, req: Request, now: float) -> None:
        super().add(req, now)
        heapq.heappush(self._heap, (req.next_deadline(), next(self._seq), req))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        super()._preempt(req, plan)
        heapq.heappush(self._heap, (req.next_deadline(), next(self._seq), req))

    def _admit_waiting(self, req: Request) -> None:
        self.waiting.remove(req)
        self._admit(req)

    # --- batch formation -------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        cfg = self.config
        model = self.latency
        running = self.running

        # Classify running requests and take the slack of each (one pass).
        decodes: list[tuple[float, int, Request]] = []
        partials: list[tuple[float, int, Request]] = []
        min_slack = min_tpot = _INF
        dec_ctx = 0
        for i, req in enumerate(running):
            g = req.generated
            slack = req.token_deadline(g) - now
            if g > 0 and req.prompt_len + g - req.num_computed == 1:
                decodes.append((slack, i, req))
                dec_ctx += req.num_computed
                if slack < min_slack:
                    min_slack = slack
                if req.slo.tpot < min_tpot:
                    min_tpot = req.slo.tpot
            else:
                partials.append((slack, i, req))

        # Time budget: the tightest decode's slack (see docs/ALGORITHM.md for the
        # paper-style max(slack, tpot) variant and why it is not the default).
        nd = len(decodes)
        if nd:
            T = min_slack
            if cfg.time_budget_rule == "max-slack-tpot" and min_tpot > T:
                T = min_tpot
            T = min(max(T, cfg.time_budget_min), cfg.time_budget_max)
        else:
            T = cfg.time_budget_max
        # A decode may wait for the next step only if that step, at its shortest (all
        # decodes, nothing else), still ends before its deadline.
        if cfg.urgency_horizon == "tpot":
            horizon = None
        else:
            t_dec = model.predict(StepFeatures(nd, nd, dec_ctx + nd, dec_ctx + nd)) if nd else 0.0
            horizon = T + max(cfg.time_budget_min, t_dec)
        token_cap = cfg.max_num_batched_tokens
        plan = StepPlan(time_budget=T, token_budget=token_cap)
        feats = plan.features
        self._step_now = now

        # (a) urgent decodes: always, KV permitting
        decodes.sort()
        rest: list[Request] = []
        for slack, _, req in decodes:
            if slack >= (horizon if horizon is not None else T + req.slo.tpot):
                rest.append(req)
            elif req.state is RequestState.RUNNING and feats.new_tokens < token_cap:
                if self._reserve(req, req.num_computed + 1, slack, plan):
                    plan.add(req, 1)

        # (b) prefills: partial (running) first, then waiting, each by slack
        partials.sort()
        for slack, _, req in partials:
            if req.state is not RequestState.RUNNING:
                continue
            k = self._chunk(req, feats, T, token_cap, plan)
            if k and self._reserve(req, req.num_computed + k, slack, plan):
                plan.add(req, k)
        if not plan.preempted:
            self._admit_prefills(T, token_cap, plan)

        # (c) remaining decodes, by slack, while the step stays within T
        if rest:
            self._add_decodes(rest, plan, T, token_cap)

        plan.predicted_time = model.predict(feats) if plan.chunks else 0.0
        return plan

    def _add_decodes(self, rest: list[Request], plan: StepPlan, T: float, token_cap: int) -> None:
        feats = plan.features
        model = self.latency
        alloc = self.allocator
        # Common case first: all of them fit (a decode adds one token and its context).
        n = len(rest)
        ctx = 0
        for r in rest:
            ctx += r.num_computed
        whole = StepFeatures(feats.num_seqs + n, feats.new_tokens + n,
                             feats.context_tokens + ctx + n, feats.attention_pairs + ctx + n)
        fits_all = model.predict(whole) <= T and whole.new_tokens <= token_cap
        for req in rest:
            if req.state is not RequestState.RUNNING:
                continue   # preempted earlier in this step
            if not fits_all and (feats.new_tokens >= token_cap
                                 or model.predict(feats.with_chunk(req.num_computed, 1)) > T):
                break
            if alloc.allocate(req.request_id, req.num_computed + 1) or \
                    self._reserve(req, req.num_computed + 1, self._slack(req), plan):
                plan.add(req, 1)

    def _chunk(self, req: Request, feats: StepFeatures, T: float, token_cap: int, plan: StepPlan) -> int:
        """Largest chunk of ``req``'s pending tokens that keeps the step within ``T``."""
        cfg = self.config
        pending = req.prompt_len + req.generated - req.num_computed
        limit = min(pending, token_cap - feats.new_tokens)
        if limit <= 0:
            return 0
        k = self.latency.max_chunk(feats, req.num_computed, limit, T)
        if k < pending:
            k -= k % cfg.chunk_align
            if k < cfg.min_chunk:
                k = 0
        if k == 0 and plan.is_empty:
            k = min(pending, max(cfg.min_chunk, 1), token_cap)   # progress floor
        return k

    def _admit_prefills(self, T: float, token_cap: int, plan: StepPlan) -> None:
        heap = self._heap
        alloc = self.allocator
        feats = plan.features
        max_seqs = self.config.max_num_seqs
        while heap and len(self.running) < max_seqs and feats.new_tokens < token_cap:
            deadline, seq, req = heap[0]
            if req.state is not RequestState.WAITING:
                heapq.heappop(heap)       # admitted or aborted since it was pushed
                continue
            k = self._chunk(req, feats, T, token_cap, plan)
            if k == 0 or not alloc.allocate(req.request_id, req.num_computed + k):
                break
            heapq.heappop(heap)
            self._admit_waiting(req)
            plan.add(req, k)

    def _slack(self, req: Request) -> float:
        return req.token_deadline(req.generated) - self._step_now

    def _reserve(self, req: Request, num_tokens: int, slack: float, plan: StepPlan) -> bool:
        """Allocate KV for ``req``; when short, preempt the running request with the most
        slack that is not in this step, if it has more slack than ``req``."""
        alloc = self.allocator
        while not alloc.allocate(req.request_id, num_tokens):
            in_plan = {id(r) for r, _ in plan.chunks}
            victim = None
            best = slack
            for r in self.running:
                if r is req or id(r) in in_plan:
                    continue
                s = self._slack(r)
                if s > best:
                    best, victim = s, r
            if victim is None:
                return False
            self._preempt(victim, plan)
        return True

    # --- load estimate ---------------------------------------------------------------------
    def admission_budget(self, now: float, queued_prefill_tokens: int) -> float:
        """Prompt tokens this instance can still start within a TTFT horizon.

        Over the next ``ttft_slo`` seconds, running decodes need one step per ``tpot``;
        the fraction of time that leaves, times the prefill rate of the latency model, is
        the prompt work that fits; queued prompt tokens already claim part of it. Bounded
        by the free KV slots, since an admitted prompt must also fit the cache.
        """
        cfg = self.config
        f = StepFeatures()
        min_tpot = _INF
        for r in self.running:
            if r.generated > 0 and r.num_computed >= r.prompt_len:
                f.add(r.num_computed, 1)
                if r.slo.tpot < min_tpot:
                    min_tpot = r.slo.tpot
        busy = self.latency.predict(f) / min_tpot if f.num_seqs else 0.0
        free_frac = max(0.0, 1.0 - busy)
        compute_tokens = free_frac * cfg.ttft_slo * self._prefill_rate
        a = self.allocator
        kv_tokens = a.num_free * a.block_size
        return min(compute_tokens, kv_tokens) - queued_prefill_tokens
