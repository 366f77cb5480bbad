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
   With ``tpot_margin`` m > 0, requests are paced at ``(1 - m) * tpot``
   (``Request.set_pace``): the margin absorbs steps that overrun the model, where pacing
   at the SLO itself leaves requests exactly on it.
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
from operator import attrgetter

from fairbatch.plan import StepFeatures, StepPlan
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.base import Scheduler, register_policy

_INF = float("inf")


_by_deadline = attrgetter("deadline")


def _last_token_time(r: Request) -> float:
    return r.token_times[-1]


@register_policy
class FairBatchingScheduler(Scheduler):
    name = "fairbatching"

    def __init__(self, config, allocator, latency_model) -> None:
        super().__init__(config, allocator, latency_model)
        if not 0.0 <= config.tpot_margin < 1.0:
            raise ValueError(f"tpot_margin must be in [0, 1), got {config.tpot_margin}")
        self._heap: list[tuple[float, int, Request]] = []   # (next deadline, seq, request)
        self._seq = count()
        self._late: list[tuple[float, int, Request]] = []   # prompts past TTFT: (relaxed deadline, seq, req)
        self._step_now = 0.0
        self.latency_model_changed()

    def latency_model_changed(self) -> None:
        # Prefill throughput for the load estimate: tokens per second of T_max-long
        # pure-prefill steps, per the latency model.
        t_max = self.config.time_budget_max
        n = self.latency.max_tokens_in(t_max)
        self._prefill_rate = n / t_max if n > 0 else 0.0

    # --- waiting heap ----------------------------------------------------------------------
    def add(self, req: Request, now: float) -> None:
        m = self.config.tpot_margin
        if m and not req.generated:
            req.set_pace(req.slo.tpot * (1.0 - m))
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
        triage = cfg.triage
        self._step_now = now

        # Classify running requests in one pass (this loop is the hot path).
        decodes: list[Request] = []
        partials: list[Request] = []
        failed: list[Request] = []
        min_deadline = min_tpot = _INF
        max_tpot = 0.0
        stale = now - cfg.failed_decode_gap * cfg.tpot_slo
        for req in self.running:
            g = req.generated
            if g and req.prompt_len + g - req.num_computed == 1:
                if triage and req.ttft_missed and req.token_times[-1] >= stale:
                    # Its SLO is already missed: best effort, after everyone who can still
                    # make theirs; once its last token is failed_decode_gap TPOTs old it is
                    # served like any decode, so it never starves.
                    failed.append(req)
                    continue
                decodes.append(req)
                if req.deadline < min_deadline:
                    min_deadline = req.deadline
                tpot = req.pace
                if tpot < min_tpot:
                    min_tpot = tpot
                if tpot > max_tpot:
                    max_tpot = tpot
            else:
                partials.append(req)

        # Time budget: the tightest decode's slack, but at least its pace (a step shorter
        # than that buys little and costs the weight read of a whole extra step).
        if decodes:
            T = min_deadline - now
            if cfg.time_budget_rule == "max-slack-tpot" and min_tpot > T:
                T = min_tpot
            T = min(max(T, cfg.time_budget_min), cfg.time_budget_max)
        else:
            T = cfg.time_budget_max
        token_cap = cfg.max_num_batched_tokens
        plan = StepPlan(time_budget=T, token_budget=token_cap)

        # (a) urgent decodes: their deadline passes before the step after this one can
        # end (slack < T + tpot). Always scheduled, KV permitting.
        if min_tpot == max_tpot:
            lim = now + T + min_tpot
            urgent = [r for r in decodes if r.deadline < lim]
            rest = [r for r in decodes if r.deadline >= lim] if len(urgent) < len(decodes) else []
        else:
            lim = now + T
            urgent = [r for r in decodes if r.deadline < lim + r.pace]
            rest = [r for r in decodes if r.deadline >= lim + r.pace]
        if urgent:
            urgent.sort(key=_by_deadline)
            self._add_decodes(urgent, plan, _INF, token_cap)

        # (b) prefills: partial (running) ones, then waiting ones, each in priority order
        # (_prefill_key: the first-token deadline, or a relaxed one for prompts that can no
        # longer make theirs), each given the largest chunk that still fits T.
        if partials:
            if triage:
                factor = cfg.late_deadline_factor
                partials.sort(key=lambda r: r.arrival + factor * r.slo.ttft
                              if r.generated == 0 and r.deadline < now else r.deadline)
            else:
                partials.sort(key=_by_deadline)
            for req in partials:
                self._add_partial(req, T, token_cap, plan)
        if not plan.preempted:   # like vLLM: no admissions in a step that had to preempt
            self._admit_prefills(T, token_cap, plan)

        # (c) the remaining decodes, by deadline, while the step stays within T; then
        # those of requests that already missed their SLO
        if rest:
            rest.sort(key=_by_deadline)
            self._add_decodes(rest, plan, T, token_cap)
        if failed:
            failed.sort(key=_last_token_time)
            self._add_decodes(failed, plan, T, token_cap)

        plan.predicted_time = model.predict(plan.features) if plan.chunks else 0.0
        return plan

    def _add_partial(self, req: Request, T: float, token_cap: int, plan: StepPlan) -> None:
        if req.state is not RequestState.RUNNING:
            return
        k = self._chunk(req, plan.features, T, token_cap, plan)
        if k and self._reserve(req, req.num_computed + k, req.deadline - self._step_now, plan):
            plan.add(req, k)

    def _add_decodes(self, reqs: list[Request], plan: StepPlan, T: float, token_cap: int) -> None:
        """Add the longest prefix of ``reqs`` (in order) that keeps the step within ``T``
        (``inf``: all of them, the urgent group) and the token cap. The prefix length is
        found by bisection over prefix sums of the contexts, so it costs O(log n)
        latency-model calls, and each decode added costs a comparison and an append."""
        feats = plan.features
        n = len(reqs)
        m = n if feats.new_tokens + n <= token_cap else max(0, token_cap - feats.new_tokens)
        if T < _INF and m:
            prefix = [0]
            acc = 0
            for r in reqs:
                acc += r.num_computed
                prefix.append(acc)
            predict = self.latency.predict
            base = (feats.num_seqs, feats.new_tokens, feats.context_tokens, feats.attention_pairs)

            def fits(j: int) -> bool:
                c = prefix[j] + j
                return predict(StepFeatures(base[0] + j, base[1] + j, base[2] + c, base[3] + c)) <= T

            if not fits(m):
                lo, hi = 0, m      # fits(lo) holds (adding nothing), fits(hi) does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if fits(mid):
                        lo = mid
                    else:
                        hi = mid
                m = lo
        chunks = plan.chunks
        added = added_ctx = 0
        now = self._step_now
        for req in reqs[:m]:
            if req.state is not RequestState.RUNNING:
                continue   # preempted earlier in this step
            c = req.num_computed
            if c < req.kv_slots or self._reserve(req, c + 1, req.deadline - now, plan):
                chunks.append((req, 1))
                added += 1
                added_ctx += c
        feats.num_seqs += added
        feats.new_tokens += added
        feats.context_tokens += added_ctx + added
        feats.attention_pairs += added_ctx + added

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
        """Admit waiting prompts in priority order while they fit. Two heaps: prompts that
        can still make their first-token deadline, keyed by it, and prompts that cannot
        (triage), keyed by the relaxed deadline ``arrival + late_deadline_factor * ttft``;
        the smaller key goes first, so a late prompt yields to every prompt that can still
        make it, but only until it has waited ``late_deadline_factor`` times its TTFT."""
        heap, late = self._heap, self._late
        feats = plan.features
        cfg = self.config
        max_seqs = cfg.max_num_seqs
        now = self._step_now
        while (heap or late) and len(self.running) < max_seqs and feats.new_tokens < token_cap:
            if heap:
                deadline, _, req = heap[0]
                if req.state is not RequestState.WAITING:
                    heapq.heappop(heap)       # admitted or aborted since it was pushed
                    continue
                if cfg.triage and req.generated == 0 and (
                        deadline < now or (cfg.triage_lookahead and deadline < now + self._prefill_time(req))):
                    heapq.heappop(heap)       # can no longer meet its TTFT
                    heapq.heappush(late, (req.arrival + cfg.late_deadline_factor * req.slo.ttft,
                                          next(self._seq), req))
                    continue
            if late and late[0][2].state is not RequestState.WAITING:
                heapq.heappop(late)
                continue
            source = late if late and (not heap or late[0][0] < heap[0][0]) else heap
            req = source[0][2]
            k = self._chunk(req, feats, T, token_cap, plan)
            if k == 0 or not self._grow(req, req.num_computed + k):
                break
            heapq.heappop(source)
            self._admit_waiting(req)
            plan.add(req, k)

    def _prefill_time(self, req: Request) -> float:
        """Lower bound on the time to finish ``req``'s prompt: one step doing only that."""
        c = req.num_computed
        k = req.prompt_len - c
        return self.latency.predict(StepFeatures(1, k, c + k, k * c + k * (k + 1) * 0.5))

    def _slack(self, req: Request) -> float:
        return req.deadline - self._step_now

    def _reserve(self, req: Request, num_tokens: int, slack: float, plan: StepPlan) -> bool:
        """Allocate KV for ``req``; when short, preempt the running request with the most
        slack that is not in this step, if it ranks after ``req`` by (slack, admission):
        a strict order, so the first-ranked request can always get its blocks and the
        instance never stalls with every request waiting for another's."""
        while not self._grow(req, num_tokens):
            in_plan = {id(r) for r, _ in plan.chunks}
            victim = None
            best = (slack, req.admitted_at)
            for r in self.running:
                if r is req or id(r) in in_plan:
                    continue
                key = (self._slack(r), r.admitted_at)
                if key > best:
                    best, victim = key, r
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
                if r.pace < min_tpot:
                    min_tpot = r.pace
        busy = self.latency.predict(f) / min_tpot if f.num_seqs else 0.0
        free_frac = max(0.0, 1.0 - busy)
        compute_tokens = free_frac * cfg.ttft_slo * self._prefill_rate
        a = self.allocator
        kv_tokens = a.num_free * a.block_size
        return min(compute_tokens, kv_tokens) - queued_prefill_tokens
