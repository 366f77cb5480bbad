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
   largest chunk that keeps the step within ``T`` (chunk.py); (c) with ``defer_decodes``,
   the remaining decodes while the step fits; (d) the decodes of relegated requests last
   (late.py, shared by every policy). If nothing fits, one ``min_chunk`` prefill runs so
   the instance always progresses. Requests are paced at ``(1 - tpot_margin) * tpot``:
   room for steps that overrun the model.
3. **Preemption** (recompute) when KV runs out: relegated requests first, then the one
   with the most slack that is not in this step, only if it ranks after the request
   that needs the blocks (preempt.py).
4. **Load estimate** for a router (admission.py).

Waiting requests are kept in a heap keyed by their prefill order, which changes while
they wait only when a cached prefix is taken or given back (the prompt is then pushed
again), so selecting prefills costs O(log n) (prompt_heap.py). docs/ALGORITHM.md has what
each rule measured.
"""

from __future__ import annotations

from operator import attrgetter

from fairbatch.plan import StepPlan
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.admission import admission_budget
from fairbatch.scheduler.base import Scheduler, register_policy
from fairbatch.scheduler.chunk import fairbatching_chunk
from fairbatch.scheduler.late import Late, last_token_time
from fairbatch.scheduler.preempt import reserve_by_rank
from fairbatch.scheduler.prompt_heap import PromptHeap
from fairbatch.scheduler.set_aside import admission_order
from fairbatch.scheduler.step_budget import StepBudget

_INF = float("inf")
_by_deadline = attrgetter("deadline")


@register_policy
class FairBatchingScheduler(Scheduler):
    name = "fairbatching"
    reads = frozenset({"time_budget_min", "time_budget_max", "time_budget_rule", "tpot_margin", "prefill_work_weight",
                       "set_aside", "defer_decodes", "failed_decode_gap", "min_chunk", "chunk_align",
                       "kv_pressure_usage", "kv_pressure_budget", "step_overrun_gain"})

    def __init__(self, config, allocator, latency_model) -> None:
        super().__init__(config, allocator, latency_model)
        self._heap = PromptHeap(self._prefill_key)   # the waiting prompts (not relegated)
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
        self._heap.push(req)

    def _requeue_front(self, req: Request) -> None:
        super()._requeue_front(req)
        self._heap.push(req)

    def _work_left_changed(self, req: Request) -> None:
        super()._work_left_changed(req)
        self._heap.rekey(req)   # its prefill key read num_computed

    def _prefill_key(self, req: Request) -> float:
        """Order of prompts: the first-token deadline, plus ``prefill_work_weight`` seconds
        per prompt token still to compute (0: earliest deadline first)."""
        return req.deadline + self._work_weight * (req.prompt_len - req.num_computed)

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        super()._preempt(req, plan)
        if not (req.relegated and not req.generated):   # those went to self.relegated
            self._heap.push(req)

    def observe_step(self, predicted: float | None, measured: float) -> None:
        self._budget.observe(predicted, measured)

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
        # the decodes' share of each step: the set-aside's prefill rate is what they leave
        may_set_aside = cfg.set_aside and relegate
        decode_share = model.predict(plan.features) / T if may_set_aside and plan.chunks else 0.0

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
        heap = self._heap
        set_aside = (may_set_aside and not plan.preempted and len(heap) > 1
                     and self._admit_set_aside(partials, T, token_cap, plan, decode_share))
        while not set_aside and not plan.preempted and (head := heap.head()) is not None:
            if not self._admit_waiting(head, self.waiting, T, token_cap, plan):
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
            failed.sort(key=last_token_time)
            self._add_decodes(failed, plan, T, token_cap)

        plan.predicted_time = model.predict(plan.features) if plan.chunks else 0.0
        return plan

    def _add_partial(self, req: Request, T: float, token_cap: int, plan: StepPlan) -> None:
        if req.state is not RequestState.RUNNING:
            return
        k = fairbatching_chunk(self.latency, self.config, req, plan, T, token_cap)
        if k and self._reserve(req, req.num_computed + k, plan):
            plan.add(req, k)

    def _add_decodes(self, reqs: list[Request], plan: StepPlan, T: float, token_cap: int) -> None:
        """The longest prefix of ``reqs`` that fits ``T`` (``inf``: all, the urgent group)."""
        self._add_decode_prefix(reqs, plan, T, token_cap, lambda r, n: self._reserve(r, n, plan))

    def _admit_set_aside(self, partials: list[Request], T: float, token_cap: int, plan: StepPlan,
                         decode_share: float) -> bool:
        """Admit the waiting prompts in the Moore-Hodgson order (set_aside.py) while they
        fit. False when there was nothing to order (fewer than two prompts)."""
        # (in key order: a host that changes a waiting request's counts reports it,
        # waiting_changed, so the heap's keys are current)
        order = admission_order(self._heap.waiting(), partials,
                                self._step_now, self._prefill_rate, decode_share, self._prefill_key)
        if order is None:
            return False
        for req in order:
            if not self._admit_waiting(req, self.waiting, T, token_cap, plan):
                break
        return True

    def _admit_waiting(self, req: Request, queue, T: float, token_cap: int, plan: StepPlan) -> bool:
        """Admit ``req`` from ``queue`` (waiting or relegated) with the largest chunk that
        fits; False when it does not fit (step, seqs or KV)."""
        feats = plan.features
        if len(self.running) >= self.config.max_num_seqs or feats.new_tokens >= token_cap:
            return False
        self.take_cached_prefix(req)
        k = fairbatching_chunk(self.latency, self.config, req, plan, T, token_cap)
        if k == 0 or not self._grow(req, req.num_computed + k):
            return False
        queue.remove(req)   # the relegated queue's head, or anywhere in the waiting one
        self._heap.discard(req)
        self._admit(req)
        plan.add(req, k)
        return True

    def _rank(self, req: Request) -> tuple:
        """Preemption order (preempt.py): relegated last, then by slack, then admission."""
        return req.relegated, req.deadline - self._step_now, req.admitted_at

    def _reserve(self, req: Request, num_tokens: int, plan: StepPlan) -> bool:
        return reserve_by_rank(self, req, num_tokens, plan, self._rank)

    # --- load estimate ---------------------------------------------------------------------
    def admission_budget(self, now: float, queued_prefill_tokens: int) -> float:
        """Prompt tokens this instance can still start within a TTFT horizon (admission.py)."""
        return admission_budget(self.running, self.latency, self._prefill_rate, self.allocator,
                                self.config.ttft_slo, queued_prefill_tokens)
