"""FairBatching: slack-driven batch formation under a per-step *time* budget.

Every request has per-token deadlines (``Request.token_deadline``); ``slack`` is the time
left until its next one. Each step:

1. **Time budget** ``T`` (step_budget.py): the least decode slack, at least the tightest
   pace, shorter under KV pressure and while steps overrun the model.
2. **Formation** under ``T`` (predicted by the latency model, evaluated incrementally):
   (a) every on-time decode, by deadline, always scheduled even past ``T`` (with
   ``defer_decodes`` only those whose deadline falls before ``now + T + pace``);
   (b) prefills, partial ones then waiting ones, in order of deadline plus
   ``prefill_work_weight`` per prompt token left (with ``late`` relegating or rejecting,
   the waiting ones through a Moore-Hodgson set-aside: set_aside.py), each given the
   largest chunk that keeps the step within ``T`` (rounded down to ``chunk_align``, at
   least ``min_chunk`` unless it finishes the prompt); (c) with ``defer_decodes``, the
   remaining decodes while the step fits; (d) the decodes of relegated requests last
   (late.py, shared by every policy). If nothing fits, one ``min_chunk`` prefill runs so
   the instance always progresses. Requests are paced at ``(1 - tpot_margin) * tpot``:
   room for steps that overrun the model.
3. **Preemption** (recompute) when KV runs out: relegated requests first, then the one
   with the most slack that is not in this step, only if it ranks after the request
   that needs the blocks.
4. **Load estimate** for a router (admission.py).

Waiting requests are kept in a heap keyed by their prefill order, which cannot change
while they wait, so selecting prefills costs O(log n). docs/ALGORITHM.md has what each
rule measured.
"""

from __future__ import annotations

import heapq
from itertools import count
from operator import attrgetter

from fairbatch.plan import StepFeatures, StepPlan, StepResult
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.admission import admission_budget
from fairbatch.scheduler.base import Scheduler, register_policy
from fairbatch.scheduler.late import Late
from fairbatch.scheduler.set_aside import moore_hodgson
from fairbatch.scheduler.step_budget import StepBudget

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
        self._step_now = 0.0
        w = config.prefill_work_weight
        self._work_weight = w if w is not None else (0.008 if self.late is Late.SERVE else 0.0)
        self._budget = StepBudget(config, allocator)
        self.latency_model_changed()

    def latency_model_changed(self) -> None:
        # Prefill throughput for the load estimate: tokens per second of T_max-long
        # pure-prefill steps, per the latency model.
        t_max = self.config.time_budget_max
        n = self.latency.max_tokens_in(t_max)
        self._prefill_rate = n / t_max if n > 0 else 0.0

    # --- waiting heap ----------------------------------------------------------------------
    def add(self, req: Request, now: float, *, validate: bool = True) -> None:
        m = self.config.tpot_margin
        if m and not req.generated:
            req.set_pace(req.slo.tpot * (1.0 - m))
        super().add(req, now, validate=validate)

    def _enqueue(self, req: Request) -> None:
        super()._enqueue(req)
        heapq.heappush(self._heap, (self._prefill_key(req), next(self._seq), req))

    def _requeue_front(self, req: Request) -> None:
        super()._requeue_front(req)
        heapq.heappush(self._heap, (self._prefill_key(req), next(self._seq), req))

    def _prefill_key(self, req: Request) -> float:
        """Order of prompts: the first-token deadline, plus ``prefill_work_weight`` seconds
        per prompt token still to compute (0: earliest deadline first)."""
        return req.deadline + self._work_weight * (req.prompt_len - req.num_computed)

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        super()._preempt(req, plan)
        if not (req.relegated and not req.generated):
            heapq.heappush(self._heap, (self._prefill_key(req), next(self._seq), req))

    def on_step_end(self, plan: StepPlan, result: StepResult, now: float) -> list[Request]:
        self._budget.observe(plan, result)
        return super().on_step_end(plan, result, now)

    # --- batch formation -------------------------------------------------------------------
    def _form(self, now: float) -> StepPlan:
        cfg = self.config
        model = self.latency
        relegate = self.late is not Late.SERVE
        self._step_now = now

        # Classify running requests in one pass (this loop is the hot path).
        decodes: list[Request] = []
        partials: list[Request] = []
        failed: list[Request] = []
        min_deadline = min_tpot = _INF
        max_tpot = 0.0
        gap = cfg.failed_decode_gap
        for req in self.running:
            g = req.generated
            if g and req.prompt_len + g - req.num_computed == 1:
                if relegate and req.relegated and req.token_times[-1] >= now - gap * req.pace:
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

        T = self._budget.seconds(min_deadline - now if decodes else None, min_tpot)
        token_cap = cfg.max_num_batched_tokens
        plan = StepPlan(time_budget=T, token_budget=token_cap)

        # (a) urgent decodes: their deadline passes before the step after this one can
        # end (slack < T + tpot). Always scheduled, KV permitting.
        if not cfg.defer_decodes:
            urgent, rest = decodes, []   # every on-time decode runs every step
        elif min_tpot == max_tpot:
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
        # the share of each step the decodes take: what is left is the prefill rate
        decode_share = model.predict(plan.features) / T if plan.chunks else 0.0

        # (b) prefills: running partial prefills, then waiting prompts, each in priority
        # order (_prefill_key) and given the largest chunk that still fits T; then the
        # relegated ones (late), partial before waiting, after every prompt on time.
        key = self._prefill_key
        late_partials = []
        if partials:
            partials.sort(key=key)
            for req in partials:
                if req.relegated:
                    late_partials.append(req)
                else:
                    self._add_partial(req, T, token_cap, plan)
        # like vLLM, no admissions in a step that had to preempt
        set_aside = (cfg.set_aside and relegate and not plan.preempted and len(self._heap) > 1
                     and self._admit_set_aside(partials, T, token_cap, plan, decode_share))
        while not set_aside and not plan.preempted and (head := self._waiting_head()) is not None:
            if not self._admit_waiting(head, self._heap, T, token_cap, plan):
                break
        for req in late_partials:
            self._add_partial(req, T, token_cap, plan)
        relegated = self.relegated
        while not plan.preempted and relegated:
            if not self._admit_waiting(relegated[0], relegated, T, token_cap, plan):
                break

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
        """The longest prefix of ``reqs`` that fits ``T`` (``inf``: all, the urgent group)."""
        now = self._step_now
        self._add_decode_prefix(reqs, plan, T, token_cap,
                                lambda r, n: self._reserve(r, n, r.deadline - now, plan))

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

    def _admit_set_aside(self, partials: list[Request], T: float, token_cap: int, plan: StepPlan,
                         decode_share: float) -> bool:
        """Moore-Hodgson over the waiting prompts: in priority order, at the prefill rate
        the decodes leave, set aside the longest prompt whenever one would finish past its
        deadline; admit the others in order, then the set-aside ones, while they fit.
        False when there was nothing to order (fewer than two prompts)."""
        now = self._step_now
        key = self._prefill_key
        waiting = sorted({id(e[2]): e[2] for e in self._heap if e[2].state is RequestState.WAITING
                          and not (e[2].relegated and not e[2].generated)}.values(), key=key)
        # streams preempted for KV resume first; the set-aside orders prompts only
        resumed = [r for r in waiting if r.generated]
        cands = [r for r in waiting if not r.generated]
        # prompts past their deadline here were promoted back (late_deadline_factor): their
        # turn has come, so they go first and are never set aside
        promoted = [r for r in cands if r.deadline <= now]
        if promoted:
            cands = [r for r in cands if r.deadline > now]
        if len(cands) < 2 and not promoted and not resumed:
            return False
        # the rate the decodes leave, not this step's: the chunks already in it (partial
        # prefills) are counted as work ahead of the waiting prompts
        rate = self._prefill_rate * max(0.1, 1.0 - decode_share)
        ahead = sum(r.prompt_len - r.num_computed for r in partials if not r.relegated) / rate
        order = resumed + promoted + moore_hodgson(cands, now, ahead, rate, key)
        feats = plan.features
        for req in order:
            if len(self.running) >= self.config.max_num_seqs or feats.new_tokens >= token_cap:
                return True
            k = self._chunk(req, feats, T, token_cap, plan)
            if k == 0 or not self._grow(req, req.num_computed + k):
                return True
            self.waiting.remove(req)   # its heap entry goes stale (not WAITING)
            self._admit(req)
            plan.add(req, k)
        return True

    def _waiting_head(self) -> Request | None:
        """The waiting prompt that can still make its TTFT with the smallest key (stale heap
        entries, admitted, aborted or relegated since they were pushed, are dropped)."""
        heap = self._heap
        while heap:
            req = heap[0][2]
            # relegated prompts wait in self.relegated; a relegated request preempted after
            # its first token is recomputed from here like any other
            if req.state is RequestState.WAITING and not (req.relegated and not req.generated):
                return req
            heapq.heappop(heap)
        return None

    def _admit_waiting(self, req: Request, source, T: float, token_cap: int, plan: StepPlan) -> bool:
        """Admit ``req``, the head of ``source`` (the deadline heap or the relegated queue),
        with the largest chunk that fits; False when it does not fit (step, seqs or KV)."""
        feats = plan.features
        if len(self.running) >= self.config.max_num_seqs or feats.new_tokens >= token_cap:
            return False
        k = self._chunk(req, feats, T, token_cap, plan)
        if k == 0 or not self._grow(req, req.num_computed + k):
            return False
        if source is self._heap:
            heapq.heappop(source)
            self.waiting.remove(req)
        else:
            source.popleft()
        self._admit(req)
        plan.add(req, k)
        return True

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
            best = (req.relegated, slack, req.admitted_at)
            for r in self.running:
                if r is req or id(r) in in_plan:
                    continue
                key = (r.relegated, self._slack(r), r.admitted_at)
                if key > best:
                    best, victim = key, r
            if victim is None:
                return False
            self._preempt(victim, plan)
        return True

    # --- load estimate ---------------------------------------------------------------------
    def admission_budget(self, now: float, queued_prefill_tokens: int) -> float:
        """Prompt tokens this instance can still start within a TTFT horizon (admission.py)."""
        return admission_budget(self.running, self.latency, self._prefill_rate, self.allocator,
                                self.config.ttft_slo, queued_prefill_tokens)
