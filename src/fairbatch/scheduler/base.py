"""The Scheduler interface, the mechanics every policy shares, and the policy registry.

Shared mechanics: the waiting queue and running list, KV allocation through the
BlockAllocator, recompute preemption, late-request handling (``late.py``: relegation and
rejection, the same for every policy) and the bookkeeping after a step. A policy only
decides which tokens run this step (``_form``). Nothing here reads a clock: ``now`` is
always given, so the simulator and the engine drive the same objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import heapq
from collections import deque
from dataclasses import dataclass
from itertools import count
from typing import Callable, ClassVar, Iterable, Sequence

from fairbatch.kv import BlockAllocator, check_fits
from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request, RequestState
from fairbatch.scheduler.config import OPTIONS, SHARED_OPTIONS, SchedulerConfig
from fairbatch.scheduler.delivery_lead import DeliveryLead
from fairbatch.scheduler.prefix_reuse import PrefixReuse
from fairbatch.scheduler.late import Late, latest_start


@dataclass(slots=True)
class Load:
    """What a router knows of an instance."""

    running: int
    waiting: int
    kv_usage: float                      # fraction of KV blocks in use
    free_blocks: int
    num_blocks: int
    queued_prefill_tokens: int           # prompt tokens not yet computed (waiting + partial)
    admission_budget: float              # prompt tokens it can still start within TTFT
    time: float = 0.0                    # when it was measured

    @property
    def num_requests(self) -> int:
        return self.running + self.waiting


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    rejected: int = 0       # refused: could not meet their TTFT (late=reject)
    relegated: int = 0      # requests put behind the ones on time (late=relegate|reject)


class Scheduler(ABC):
    """Base of every policy. A policy implements ``_form`` (which chunks run in a step);
    the queues, KV, preemption and late requests are handled here.

    What every host calls (the simulator, the engine, the server, the vLLM plugin); no
    method reads a clock, ``now`` is given:

    - ``add(req, now)`` a request arrives; ``abort(request_id, now)`` it is cancelled;
    - ``schedule(now) -> StepPlan`` the chunks of the next step, their KV allocated;
    - ``on_step_end(plan, result, now)`` the step ran: advance its requests, return the
      finished ones;
    - ``load(now)``, ``get(request_id)``, ``has_work()``, ``num_waiting``, ``num_running``,
      ``request_ids()``, ``stats``;
    - ``latency_model_changed()`` after the step-time model was refitted.

    A host that plans the next step while the last one still runs (``--async-scheduling``:
    ``fairbatch.step_ahead``) splits ``on_step_end`` in two: ``advance_in_flight(plan,
    now)`` when the step is launched (counts, deadlines and length finishes as if it had
    ended at ``now``, its predicted end; token ids unknown), ``settle(plan, result, end)``
    when its tokens are back (ids, the real time, stop finishes, relegation).

    A host that owns the request objects and applies step results itself (vLLM: its
    own stop conditions, preemptions and running list) calls, instead of
    ``on_step_end``:

    - ``sync_running(reqs)`` its running list, in its order (before and after
      ``schedule``);
    - ``record_tokens(req, n, now)`` ``req`` has ``n`` output tokens;
    - ``finish(request_id, now, reason)`` it ended a request by its own stop conditions;
    - ``requeue(req, plan)`` it preempted ``req`` by itself, or could not run the
      admission of ``req`` in ``plan`` after all;
    - ``waiting_changed(req)`` it changed the counts or deadline of waiting ``req``.
    """

    name: ClassVar[str] = "abstract"
    #: the SchedulerConfig fields this policy reads beyond SHARED_OPTIONS (a subclass that
    #: reads more extends its parent's); setting any other for it is an error
    #: (``check_policy_options``). tests/test_policy_options.py runs every policy on a
    #: config that records what it reads and fails on a field not declared here.
    reads: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, latency_model: LatencyModel) -> None:
        self.config = config
        self.allocator = allocator
        self.latency = latency_model
        self.waiting: deque[Request] = deque()   # FCFS; preempted requests go to the front
        self.running: list[Request] = []         # in admission order
        self.stats = SchedulerStats()
        self._by_id: dict[str, Request] = {}
        self._admissions = 0
        # late-request handling, shared by every policy (late.py)
        self.late = Late.parse(config.late)
        self.relegated: deque[Request] = deque()  # waiting prompts that cannot make their TTFT
        self._late_watch: list[tuple[float, int, Request]] = []   # (latest start, seq, request)
        self._late_seq = count()
        self._rejected: list[Request] = []        # refused since the host last asked
        # A host that measures each step's whole cycle (start to the next step's start, the
        # clock its deadlines and its online model's refit run on) reports it through
        # ``observe_step`` and sets this: ``on_step_end`` then leaves the step-time
        # corrections alone (the executor's duration leaves out the host's share)
        self.host_reports_steps = False
        q = config.ttft_margin_quantile           # first tokens planned ahead of delivery
        self._delivery = DeliveryLead(q) if q is not None else None
        self._prefix = PrefixReuse(allocator, self._work_left_changed)   # prefix caching (prefix_reuse.py)
        # finished by length when launched, their last token not yet settled (advance_in_flight)
        self._finished_in_flight: dict[str, Request] = {}
        self._pinned = self._prefix.pinned        # waiting requests holding a cached prefix

    # --- interface -------------------------------------------------------------------------
    def add(self, req: Request, now: float, *, validate: bool = True) -> None:
        """Queue ``req``. Raises ValueError if it can never run here (context, KV);
        ``validate=False`` skips those checks, for a host that validated the request
        against its own limits and runs it whatever ours say (vLLM). With
        ``late=reject``, a request that cannot meet its TTFT even now comes back refused
        (``req.state is RequestState.REJECTED``), holding nothing."""
        if req.request_id in self._by_id:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if validate:
            self._check_limits(req)
        req.state = RequestState.WAITING
        lead = self.config.ttft_margin
        if self._delivery is not None and self._delivery.lead > lead:
            lead = self._delivery.lead
        if lead and not req.generated:
            req.plan_first_token_early(lead)
        self._by_id[req.request_id] = req
        if req.block_hashes is not None:
            self.take_cached_prefix(req)   # before its deadline checks: they price what is left
        if self.late is not Late.SERVE and self._watch(req, now, arriving=True):
            return   # refused (state REJECTED) or relegated at arrival
        self._enqueue(req)

    def _check_limits(self, req: Request) -> None:
        """Raise ValueError if ``req`` can never run here (``kv.check_fits``); trim its
        output to the context."""
        limit, a = self.config.max_model_len, self.allocator
        try:
            check_fits(req.prompt_len, req.max_new_tokens, limit, a.block_size, a.num_blocks)
        except ValueError as e:
            raise ValueError(f"request {req.request_id}: {e}") from None
        req.max_new_tokens = min(req.max_new_tokens, limit - req.prompt_len)

    def _enqueue(self, req: Request) -> None:
        """Queue a waiting request that can still meet its SLO (policies with their own
        order extend this)."""
        self.waiting.append(req)

    def abort(self, request_id: str, now: float) -> Request | None:
        """Drop a request wherever it is and free its blocks at once. One that finished by
        length in a step still in flight (one step ahead) is aborted too: its last token,
        not yet out, is then dropped when the step settles."""
        late = self._finished_in_flight.pop(request_id, None)
        if late is not None:
            late.state, late.finish_reason, late.finish_time = RequestState.ABORTED, "abort", now
            self.stats.finished -= 1
            self.stats.aborted += 1
            return late
        return self._remove(request_id, now, RequestState.ABORTED, "abort")

    def finish(self, request_id: str, now: float, reason: str = "stop") -> Request | None:
        """For a host that applies its own stop conditions (vLLM): it ended the request
        (``reason``: "stop", "length", ...). Taken out wherever it is, blocks freed,
        counted as finished."""
        return self._remove(request_id, now, RequestState.FINISHED, reason)

    def _remove(self, request_id: str, now: float, state: RequestState, reason: str) -> Request | None:
        req = self._by_id.pop(request_id, None)
        if req is None:
            return None
        if req.state is RequestState.RUNNING:
            self.running.remove(req)
        else:
            self._unqueue(req)
            self._pinned.pop(request_id, None)
        self.allocator.free(request_id)
        req.kv_slots = 0
        req.state = state
        req.finish_reason = reason
        req.finish_time = now
        if state is RequestState.ABORTED:
            self.stats.aborted += 1
        else:
            self.stats.finished += 1
        return req

    def schedule(self, now: float) -> StepPlan:
        """Choose the chunks of the next step. Allocates their KV blocks. Requests refused
        on the way (``late=reject``) are in ``plan.rejected``, holding nothing."""
        if self.late is Late.SERVE:
            return self._form(now)
        self._sweep_late(now)
        plan = self._form(now)
        if self._rejected:
            plan.rejected, self._rejected = self._rejected, []
        return plan

    @abstractmethod
    def _form(self, now: float) -> StepPlan:
        """The policy: which chunks run in the step that starts at ``now``."""

    # --- late requests (late.py) -----------------------------------------------------------
    def _watch(self, req: Request, now: float, *, arriving: bool = False) -> bool:
        """Give up on ``req`` now if it cannot meet its TTFT, else remember when to look
        again. Returns True if it was given up on. A waiting prompt that gave its cached
        prefix back takes it again first if it is still cached: it would at admission, so
        the work left without it is no lower bound."""
        t = latest_start(self.latency, req)
        if t < now and not arriving and self._retake_prefix(req):
            t = latest_start(self.latency, req)
        if t < now:
            self._give_up(req, now, arriving=arriving)
            return True
        if req.late_check != t:   # (equal: the prefix just taken again queued it under t)
            req.late_check = t
            heapq.heappush(self._late_watch, (t, next(self._late_seq), req))
        return False

    def _retake_prefix(self, req: Request) -> bool:
        """A waiting request holding no KV takes its cached prefix again; True if it now
        holds one."""
        if req.block_hashes is None or req.kv_slots or req.state is not RequestState.WAITING:
            return False
        self.take_cached_prefix(req)
        return req.kv_slots > 0

    def _watch_again(self, req: Request) -> None:
        """``req``'s prompt work left (or deadline) changed while watched: its latest start
        moved, so it is looked at when the new one passes (an entry under the old time is
        skipped). A prompt that gave its cached prefix back must be found earlier."""
        if req.generated or req.relegated or req.state not in _WATCHED:
            return
        t = latest_start(self.latency, req)
        if t != req.late_check:
            req.late_check = t
            heapq.heappush(self._late_watch, (t, next(self._late_seq), req))

    def _sweep_late(self, now: float) -> None:
        """Find the prompts that can no longer meet their TTFT: each is looked at when its
        latest start passes (a heap), so a step costs O(log n) per request it finds."""
        watch = self._late_watch
        while watch and watch[0][0] < now:
            t, _, req = heapq.heappop(watch)
            if req.generated or req.relegated or req.late_check != t or req.state not in _WATCHED:
                continue   # first token out, already given up on, re-watched or gone
            self._watch(req, now)   # a partial prefill's remainder may still fit: look again
        relegated = self.relegated
        factor = self.config.late_deadline_factor
        if relegated and factor != float("inf"):
            head = relegated[0]
            if head.arrival + factor * head.slo.ttft < now:   # waited long enough: compete again
                relegated.popleft()
                head.relegated = False
                head.late_check = _INF   # past its deadline on purpose: no longer watched
                self._requeue_front(head)

    def _give_up(self, req: Request, now: float, *, arriving: bool = False) -> None:
        """``req`` cannot meet its TTFT: refuse it (reject) or put it behind everyone on
        time (relegate). A request streaming tokens is never refused."""
        if self.late is Late.REJECT and req.generated == 0:
            if req.state is RequestState.RUNNING:
                self.running.remove(req)
            elif req.state is RequestState.WAITING:
                self._unqueue(req)
                self._pinned.pop(req.request_id, None)
            self.allocator.free(req.request_id)
            req.kv_slots = 0
            req.state = RequestState.REJECTED
            req.finish_reason = "rejected"
            req.finish_time = now
            self._by_id.pop(req.request_id, None)
            if not arriving:          # refused at arrival: add's caller sees the state
                self._rejected.append(req)
            self.stats.rejected += 1
            return
        req.relegated = True
        self.stats.relegated += 1
        if req.state is RequestState.WAITING:
            self._unqueue(req)
            self.relegated.append(req)

    def _unqueue(self, req: Request) -> None:
        """Take a waiting request out of the queues (policies with their own structures
        may drop it lazily)."""
        try:
            self.waiting.remove(req)
        except ValueError:
            try:
                self.relegated.remove(req)
            except ValueError:
                pass

    def _requeue_front(self, req: Request) -> None:
        """A relegated prompt competes again, ahead of the on-time queue (it is the oldest)."""
        self.waiting.appendleft(req)

    def on_step_end(self, plan: StepPlan, result: StepResult, now: float) -> list[Request]:
        """Advance every scheduled request; returns those that finished (blocks freed)."""
        if not self.host_reports_steps:
            self.observe_step(plan.predicted_time, result.duration)
        return self._advance(plan, now, result.token_ids, result.stopped, decide_late=True)

    # --- for a host that plans one step ahead (step_ahead.py) ----------------------------
    def advance_in_flight(self, plan: StepPlan, now: float) -> list[Request]:
        """``plan`` was launched and is predicted to end at ``now``: advance its requests as
        ``on_step_end`` would, recording each new token at ``now`` without its id, so that
        the next step can be planned before this one's tokens are known. Requests that
        reach ``max_tokens`` finish here; stops and relegation wait for ``settle``."""
        finished = self._advance(plan, now, {}, set(), decide_late=False)
        for req in finished:
            self._finished_in_flight[req.request_id] = req    # an abort may still end it (abort)
        return finished

    def _advance(self, plan: StepPlan, now: float, token_ids: dict[str, int], stopped: set[str], *,
                 decide_late: bool) -> list[Request]:
        """The step's chunks computed and its tokens recorded at ``now`` (with their ids
        and stops when known); ``decide_late``: relegate a first token past its TTFT."""
        finished: list[Request] = []
        running = RequestState.RUNNING
        relegate = decide_late and self.late is not Late.SERVE
        for req, k in plan.chunks:
            if req.state is not running:
                continue  # aborted while the step ran
            c = req.num_computed + k
            req.num_computed = c
            if c == req.prompt_len + req.generated:
                if token_ids:
                    rid = req.request_id
                    req.record_token(now, token_ids.get(rid))
                    if stopped and rid in stopped:
                        req.finish_reason = "stop"
                        finished.append(req)
                        continue
                else:
                    req.record_token(now)
                if req.generated >= req.max_new_tokens:
                    req.finish_reason = "length"
                    finished.append(req)
                elif relegate and req.generated == 1 and req.ttft_missed and not req.relegated:
                    req.relegated = True      # its SLO is lost: best effort from here on
                    self.stats.relegated += 1
        if self._prefix.naming:
            self._prefix.name_computed_blocks()
        if finished:
            for req in finished:
                self._finish(req, now)
        self.stats.steps += 1
        return finished

    def settle(self, plan: StepPlan, result: StepResult, end: float) -> list[Request]:
        """The tokens of ``plan`` (advanced by ``advance_in_flight``) are back at ``end``:
        give each its id and its real time, finish the requests that sampled a stop token
        (they may already sit in the next step, whose token for them is then dropped) and
        relegate a first token past its TTFT, as ``on_step_end`` does. Returns the
        requests finished here."""
        finished: list[Request] = []
        token_ids = result.token_ids
        stopped = result.stopped
        running = RequestState.RUNNING
        relegate = self.late is not Late.SERVE
        seen: set[str] = set()
        for req, _ in plan.chunks:
            rid = req.request_id
            tok = token_ids.get(rid)
            if tok is None or rid in seen or len(req.output_token_ids) >= req.generated:
                continue   # sampled nothing, or ended before its token was counted
            seen.add(rid)
            self._finished_in_flight.pop(rid, None)
            if req.state is RequestState.ABORTED:
                req.drop_unsettled_token()     # the host ended it while its token was in flight
                continue
            req.settle_last_token(end, tok)
            if req.state is RequestState.WAITING:      # preempted by the step planned meanwhile
                if stopped and rid in stopped:
                    self.finish(rid, end, "stop")
                    finished.append(req)
                else:
                    self._work_left_changed(req)       # its deadline may have moved
                continue
            if req.state is not running:               # finished by length when launched
                if stopped and rid in stopped:
                    req.finish_reason = "stop"         # ... with a stop token: as on_step_end says
                continue
            if stopped and rid in stopped:
                req.finish_reason = "stop"
                finished.append(req)
            elif req.generated == 1 and req.ttft_missed and relegate and not req.relegated:
                req.relegated = True      # its SLO is lost: best effort from here on
                self.stats.relegated += 1
        for req in finished:
            if req.state is running:
                self._finish(req, end)
        return finished

    # --- for a host that owns the request list (vLLM) -------------------------------------
    def sync_running(self, reqs: Sequence[Request]) -> None:
        """The host's running list, in its (admission) order, each marked running. Before
        ``schedule``: the requests the step may extend (one the host holds back, such as
        a request whose last token is in flight, is left out); after it: all of them, so
        that ``abort``, ``finish``, ``load`` and the next step see every one holding KV."""
        running = RequestState.RUNNING
        for req in reqs:
            req.state = running
        self.running[:] = reqs

    def record_tokens(self, req: Request, num_tokens: int, now: float) -> None:
        """``req`` has ``num_tokens`` output tokens at ``now``: those beyond the ones already
        recorded (``req.token_times``) are recorded at ``now``, as ``on_step_end`` does
        for the tokens of a step (a host may have counted in-flight tokens in
        ``req.generated`` meanwhile). A first token past the TTFT relegates the rest of a
        running request (late=relegate|reject), as ``on_step_end`` does."""
        recorded = len(req.token_times)
        if num_tokens <= recorded:
            return
        req.generated = recorded
        while req.generated < num_tokens:
            req.record_token(now)
        req.deadline = req.token_deadline(num_tokens)
        if req.block_hashes is not None:
            self.allocator.register(req.request_id, req.block_hashes, req.num_computed)
        if req.state is RequestState.WAITING:   # (vLLM: preempted while its token was in flight)
            self._work_left_changed(req)       # its deadline and work left moved
        if (recorded == 0 and req.ttft_missed and req.state is RequestState.RUNNING
                and self.late is not Late.SERVE and not req.relegated):
            req.relegated = True      # its SLO is lost: best effort from here on
            self.stats.relegated += 1

    def requeue(self, req: Request, plan: StepPlan | None = None) -> None:
        """Back to the front of the waiting queue with its KV freed (recompute
        preemption, counted as one): the host preempted ``req`` by itself (vLLM's
        ``reset_prefix_cache``), or could not run its admission in ``plan`` after all."""
        self._preempt(req, plan if plan is not None else StepPlan())

    def observe_step(self, predicted: float | None, measured: float) -> None:
        """A step the model predicted to take ``predicted`` seconds (None: the policy made
        no prediction) took ``measured``; policies that pace steps by the model use it.
        ``on_step_end`` reports the executor's duration, unless the host reports whole
        step cycles itself (``host_reports_steps``) or applies results without it (vLLM)."""

    def observe_delivery(self, delay: float) -> None:
        """A host reports how long after the step that made it a first token reached its
        client (``ttft_margin_quantile`` plans later first tokens ahead by such delays)."""
        if self._delivery is not None:
            self._delivery.observe(delay)

    def latency_model_changed(self) -> None:
        """The latency model was refitted (``OnlineLatencyModel``): re-derive whatever the
        policy computed from it at construction."""

    def load(self, now: float) -> Load:
        queued = self.queued_prefill_tokens()
        a = self.allocator
        return Load(
            running=len(self.running), waiting=self.num_waiting, kv_usage=a.usage,
            free_blocks=a.num_free, num_blocks=a.num_blocks, queued_prefill_tokens=queued,
            admission_budget=self.admission_budget(now, queued), time=now)

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed: waiting requests' (a preempted one's output
        too, to be recomputed) and running partial prefills' (``Load``'s field; O(requests))."""
        queued = sum(r.prompt_len + r.generated - r.num_computed for r in self.waiting)
        queued += sum(r.prompt_len + r.generated - r.num_computed for r in self.relegated)
        queued += sum(r.prompt_len - r.num_computed for r in self.running if r.num_computed < r.prompt_len)
        return queued

    def admission_budget(self, now: float, queued_prefill_tokens: int) -> float:
        """Prompt tokens this instance can still take (policies with a better estimate
        override this). Default: free KV token slots minus queued prompt tokens."""
        a = self.allocator
        return float(a.num_free * a.block_size - queued_prefill_tokens)

    # --- prefix caching (docs/PREFIX_CACHING.md) -------------------------------------------
    def take_cached_prefix(self, req: Request) -> None:
        """A waiting request holding no KV takes the cached blocks of its prompt's longest
        cached prefix: it then computes (and every policy prices) only the rest. Called
        when it is queued and, by every policy, before sizing its chunk at admission (its
        prefix may have been given back under KV pressure, or cached meanwhile)."""
        self._prefix.take(req)

    def waiting_changed(self, req: Request) -> None:
        """For a host that refreshes a waiting request's counts from its own state (vLLM:
        its prefix cache): ``req``'s ``num_computed``, ``generated``, ``prompt_len`` or
        ``deadline`` changed while it waits. The policy re-orders it and the late watch
        moves its latest start, as when a cached prefix is taken or given back here."""
        if req.state is RequestState.WAITING:
            self._work_left_changed(req)

    def _work_left_changed(self, req: Request) -> None:
        """A waiting request took or gave back a cached prefix (or a host changed its
        counts), so its work left changed: the late watch follows its latest start; a
        policy that keeps waiting prompts ordered by their work left extends this to move
        it."""
        if req.late_check != _INF:   # watched (late is not serve and it was queued on time)
            self._watch_again(req)

    # --- queries ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.relegated)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.relegated)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def request_ids(self) -> list[str]:
        """Every request the scheduler holds: waiting, relegated or running."""
        return list(self._by_id)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    # --- shared mechanics ------------------------------------------------------------------
    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make ``req``'s KV blocks hold ``num_tokens`` tokens. ``req.kv_slots`` caches the
        capacity so the common case (room left in its last block) costs one comparison."""
        if num_tokens <= req.kv_slots:
            return True
        alloc = self.allocator
        if not alloc.allocate(req.request_id, num_tokens):
            if not (self._pinned and self._prefix.give_back(req, num_tokens)):
                return False
            alloc.allocate(req.request_id, num_tokens)
        req.kv_slots = alloc.num_allocated(req.request_id) * alloc.block_size
        return True

    def _admit_fcfs(self, plan: StepPlan, budget: int, late_partials: Sequence[Request] = (),
                    admit: bool = True) -> int:
        """Admit waiting requests in queue order, each chunked to what is left of the token
        budget, until the budget, the sequence limit or the KV cache runs out: prompts that
        can still make their TTFT, then the relegated ones, partly prefilled
        (``late_partials``, already running) before waiting. ``admit=False`` (a step that
        preempted) runs only the partials. Returns the budget left."""
        max_seqs = self.config.max_num_seqs
        for waiting in (self.waiting, self.relegated):
            if waiting is self.relegated:
                for req in late_partials:
                    if budget <= 0:
                        return budget
                    c = req.num_computed
                    k = min(req.prompt_len - c, budget)
                    if self._grow(req, c + k):
                        plan.add(req, k)
                        budget -= k
            while admit and waiting and budget > 0 and len(self.running) < max_seqs:
                req = waiting[0]
                self.take_cached_prefix(req)
                c = req.num_computed
                k = min(req.prompt_len + req.generated - c, budget)
                if not self._grow(req, c + k):
                    return budget
                waiting.popleft()
                self._admit(req)
                plan.add(req, k)
                budget -= k
        return budget

    def _add_decode_prefix(self, reqs: list[Request], plan: StepPlan, T: float, token_cap: int,
                           reserve: Callable[[Request, int], bool]) -> None:
        """Add a decode for the longest prefix of ``reqs`` (in order) that keeps the step's
        predicted time within ``T`` (``inf``: all of them) and its tokens within
        ``token_cap``; O(log n) latency-model calls (``LatencyModel.max_decodes``).
        ``reserve(req, tokens)`` gets KV for one, preempting as the policy does."""
        feats = plan.features
        n = len(reqs)
        m = n if feats.new_tokens + n <= token_cap else max(0, token_cap - feats.new_tokens)
        if T < float("inf") and m:
            m = self.latency.max_decodes(feats, [r.num_computed for r in reqs[:m]], T)
        chunks = plan.chunks
        added = added_ctx = 0
        running = RequestState.RUNNING
        for req in reqs[:m]:
            if req.state is not running:
                continue   # preempted earlier in this step
            c = req.num_computed
            if c < req.kv_slots or reserve(req, c + 1):
                chunks.append((req, 1))
                added += 1
                added_ctx += c
        feats.num_seqs += added
        feats.new_tokens += added
        feats.context_tokens += added_ctx + added
        feats.attention_pairs += added_ctx + added    # attention_pairs(c, 1) == c + 1 each

    def _admit(self, req: Request) -> None:
        """Move the head of the waiting queue into the running list."""
        if req.block_hashes is not None:
            self._prefix.admitted(req)
        req.state = RequestState.RUNNING
        req.admitted_at = self._admissions
        self._admissions += 1
        self.running.append(req)

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        """Recompute preemption: drop the KV, requeue at the front of the waiting queue."""
        self.running.remove(req)
        self.allocator.free(req.request_id)
        req.reset_for_recompute()
        if req.block_hashes is not None:
            self.take_cached_prefix(req)   # what it computed of its prompt is named: reused
        if req.late_check != _INF:
            # it starts over (less any prefix it took back): its latest start moved back;
            # a no-op when taking the prefix already moved it
            self._watch_again(req)
        if req.relegated and not req.generated:
            self.relegated.appendleft(req)    # a relegated prompt stays behind the on-time ones
        else:
            self.waiting.appendleft(req)
        plan.preempted.append(req)
        self.stats.preemptions += 1

    def _victim(self, scheduled: int) -> Request:
        """Whom FCFS policies preempt when KV runs out, among ``running[scheduled:]`` (the
        ones not yet in this step): the newest relegated request, else the newest request
        (vLLM's choice)."""
        running = self.running
        if self.late is not Late.SERVE:
            for i in range(len(running) - 1, scheduled - 1, -1):
                if running[i].relegated:
                    return running[i]
        return running[-1]

    def _make_room(self, req: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Grow ``req``'s KV (``req`` is in ``running``) to ``num_tokens``, preempting
        ``_victim`` while the cache is short: the FCFS policies' rule. A victim already
        placed in ``plan`` gives its tokens back. False if ``req`` itself was the victim."""
        running = self.running
        while not self._grow(req, num_tokens):
            victim = self._victim(running.index(req))
            plan.remove(victim)
            self._preempt(victim, plan)
            if victim is req:
                return False
        return True

    def _finish(self, req: Request, now: float) -> None:
        req.state = RequestState.FINISHED
        req.finish_time = now
        self.running.remove(req)
        self.allocator.free(req.request_id)
        req.kv_slots = 0
        self._by_id.pop(req.request_id, None)
        self.stats.finished += 1


_WATCHED = frozenset({RequestState.WAITING, RequestState.RUNNING})
_INF = float("inf")


# --- registry -------------------------------------------------------------------------------
_POLICIES: dict[str, type[Scheduler]] = {}


def register_policy(cls: type[Scheduler]) -> type[Scheduler]:
    bad = sorted(cls.reads - (OPTIONS - SHARED_OPTIONS))
    if bad:
        raise TypeError(f"policy {cls.name}: reads names {', '.join(bad)}, which "
                        f"{'are' if len(bad) > 1 else 'is'} no SchedulerConfig field or a shared one")
    _POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_POLICIES)


def _policy(name: str) -> type[Scheduler]:
    _load_builtin()
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(_POLICIES))}") from None


def policy_options(name: str) -> frozenset[str]:
    """Every SchedulerConfig field policy ``name`` reads: the shared ones and its own."""
    return SHARED_OPTIONS | _policy(name).reads


def check_policy_options(name: str, options: Iterable[str]) -> None:
    """Raise ValueError if ``options`` (SchedulerConfig field names set for policy
    ``name`` alone: a variant, a server's ``--set``) holds one that policy does not read,
    naming the policies that do; a setting nobody reads would be silently ignored. Options
    of a comparison of several policies (``Scenario.scheduler``) are not checked: they are
    shared by every policy of it."""
    cls = _policy(name)
    for key in options:
        if key in SHARED_OPTIONS or key in cls.reads:
            continue
        if key not in OPTIONS:
            raise ValueError(f"unknown scheduler option {key!r}; {name} reads "
                             f"{', '.join(sorted(policy_options(name)))}")
        readers = [n for n, c in sorted(_POLICIES.items()) if key in c.reads]
        owners = f"an option of {', '.join(readers)}" if readers else "read by no policy"
        raise ValueError(f"{key} is {owners}; {name} does not read it")


def make_scheduler(name: str, config: SchedulerConfig, allocator: BlockAllocator,
                   latency_model: LatencyModel) -> Scheduler:
    return _policy(name)(config, allocator, latency_model)


def _load_builtin() -> None:
    # Import for the side effect of registration; kept lazy so base has no cycles.
    from fairbatch.scheduler import vllm, sarathi, fairbatching, prefill_first, vllm_priority, qoserve  # noqa: F401
