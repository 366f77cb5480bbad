"""Property tests: every policy, random small workloads, through the real simulator loop."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepFeatures, StepPlan, StepResult
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.scheduler.late import Late, latest_start
from fairbatch.sim import SimExecutor, simulate

MODEL = LinearLatencyModel(a=0.005, b=4e-5, c=2e-7, d=1e-10, e=2e-5)


class CheckingExecutor(SimExecutor):
    """Checks each plan against its policy's budget before 'running' it."""

    def __init__(self, model, scheduler) -> None:
        super().__init__(model)
        self.scheduler = scheduler
        self.over_time_budget = 0
        self.now = 0.0
        schedule = scheduler.schedule

        def schedule_at(now: float) -> StepPlan:   # the step's start, for the late check
            self.now = now
            return schedule(now)
        scheduler.schedule = schedule_at

    def execute(self, plan: StepPlan) -> StepResult:
        cfg = self.scheduler.config
        ks = [k for _, k in plan.chunks]
        assert all(k >= 1 for k in ks)
        assert len({id(r) for r, _ in plan.chunks}) == len(ks), "request scheduled twice in a step"
        assert len(ks) <= cfg.max_num_seqs
        # Policies sum the step's features in bulk on their hot paths: they must equal a
        # chunk-by-chunk recount (the latency model prices the step from them).
        recount = StepFeatures.of_chunks(plan.chunks)
        f = plan.features
        assert (f.num_seqs, f.new_tokens, f.context_tokens) == (recount.num_seqs, recount.new_tokens, recount.context_tokens)
        assert f.attention_pairs == pytest.approx(recount.attention_pairs)
        for req, k in plan.chunks:
            assert req.num_computed + k <= req.prompt_len + req.generated, "computes unknown tokens"
            alloc = self.scheduler.allocator
            assert alloc.num_allocated(req.request_id) * alloc.block_size >= req.num_computed + k, "no KV slots"
            if self.scheduler.late is not Late.SERVE and not (req.generated or req.relegated) and req.late_check != float("inf"):
                # the late watch gives up on a prompt once its remaining prefill can no
                # longer make its TTFT (also after a preemption made that remainder longer)
                assert latest_start(self.model, req) >= self.now - 1e-12, f"late prompt scheduled: {req}"
        name = self.scheduler.name
        if name == "vllm":
            assert plan.num_tokens <= cfg.max_num_batched_tokens
        elif name == "vllm-priority":
            assert plan.num_tokens <= cfg.max_num_batched_tokens
        elif name == "sarathi":
            assert plan.num_tokens <= self.scheduler.token_budget
        elif name == "fairbatching":
            assert plan.num_tokens <= cfg.max_num_batched_tokens
            T = plan.time_budget
            assert cfg.time_budget_min <= T <= cfg.time_budget_max
            if self.model.predict(plan.features) > T * (1 + 1e-9):
                # The documented floor: only urgent decodes, or one minimum-size prefill alone.
                self.over_time_budget += 1
                only_decodes = all(k == 1 and r.generated > 0 for r, k in plan.chunks)
                lone_min_chunk = len(ks) == 1 and ks[0] <= max(cfg.min_chunk, 1)
                assert only_decodes or lone_min_chunk, f"time budget broken: {plan}"
        elif name == "qoserve":
            # Prefill fills the step up to the step-size cap (decodes count towards it, but
            # are never cut by it) and within T = least decode slack / safety factor; past T
            # only decodes and the step-size floor's prefill run.
            assert plan.num_tokens <= cfg.max_num_batched_tokens
            decodes = sum(1 for r, k in plan.chunks if k == 1 and r.generated and r.num_computed + 1 == r.num_tokens)
            prefill = plan.num_tokens - decodes
            step_cap = min(cfg.qoserve_max_step_tokens, cfg.max_num_batched_tokens)
            assert plan.token_budget == step_cap
            if decodes and prefill:
                assert prefill <= max(0, step_cap - decodes) or any(r.relegated for r, _ in plan.chunks)
            lone_min_chunk = len(ks) == 1 and ks[0] <= max(cfg.min_chunk, 1)
            assert prefill <= step_cap or lone_min_chunk
            T = plan.time_budget
            if T is not None and self.model.predict(plan.features) > T * (1 + 1e-9):
                self.over_time_budget += 1
                assert prefill <= max(0, cfg.qoserve_min_step_tokens - decodes), f"time budget broken: {plan}"
        return super().execute(plan)


SLO_CLASSES = [(1.0, 0.05), (0.3, 0.02), (4.0, 0.2)]
workloads = st.lists(
    st.tuples(
        st.floats(0, 3.0),                 # arrival
        st.integers(1, 400),               # prompt length
        st.integers(1, 60),                # output length
        st.sampled_from(SLO_CLASSES),      # SLO class
    ),
    min_size=1, max_size=40,
)


@pytest.mark.parametrize("policy", policy_names())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=workloads, num_blocks=st.integers(32, 200), budget=st.sampled_from([64, 256, 2048]),
       late=st.sampled_from(["serve", "relegate", "reject"]))
def test_policy_invariants(policy: str, spec, num_blocks: int, budget: int, late: str) -> None:
    """Under every ``late`` mode: nothing starves (every request not refused finishes with
    all its tokens), a refused request never produced a token and holds no KV, and no
    block leaks."""
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=512,
                          chunk_size=min(budget, 256) if policy == "sarathi" else None, late=late)
    alloc = BlockAllocator(num_blocks, 16)
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    ex = CheckingExecutor(MODEL, sched)
    # priorities as the simulator gives them (tighter SLO class first): only vllm-priority reads them
    reqs = [Request(f"r{i}", a, p, o, SLO(*slo), priority=sorted(SLO_CLASSES).index(slo))
            for i, (a, p, o, slo) in enumerate(spec)]
    fits = [r for r in reqs if alloc.blocks_for(r.prompt_len + r.max_new_tokens) <= num_blocks]
    out = simulate(fits, [Instance(sched, ex)])
    assert out.unfinished == 0, "a request waited forever"
    refused = [r for r in fits if r.state is RequestState.REJECTED]
    if late != "reject":
        assert not refused
    for r in refused:
        assert r.generated == 0 and r.finish_reason == "rejected"
        assert alloc.num_allocated(r.request_id) == 0
    assert sched.stats.rejected == len(refused)
    for r in fits:
        if r.state is RequestState.REJECTED:
            continue
        assert r.generated == r.max_new_tokens
        assert len(r.token_times) == r.generated
        assert list(r.token_times) == sorted(r.token_times)
        assert r.first_token_time is not None and r.first_token_time > r.arrival
    assert alloc.num_free == alloc.num_blocks, "KV blocks leaked"
    alloc.check_invariants()
    assert not sched.has_work()


@pytest.mark.parametrize("policy", policy_names())
def test_below_capacity_everyone_meets_slo(policy: str) -> None:
    """A light, steady load is served within its SLOs by every policy."""
    cfg = SchedulerConfig(max_model_len=4096)
    alloc = BlockAllocator(4000, 16)
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    reqs = [Request(f"r{i}", i * 0.5, 500 + 37 * (i % 7), 30 + i % 11, SLO(1.0, 0.05)) for i in range(60)]
    out = simulate(reqs, [Instance(sched, SimExecutor(MODEL))])
    assert out.unfinished == 0
    for r in reqs:
        assert r.first_token_time - r.arrival <= 1.0
        assert (r.finish_time - r.first_token_time) / (r.generated - 1) <= 0.05


def test_abort_frees_blocks_immediately() -> None:
    for policy in policy_names():
        alloc = BlockAllocator(100, 16)
        sched = make_scheduler(policy, SchedulerConfig(max_model_len=1024), alloc, MODEL)
        inst = Instance(sched, SimExecutor(MODEL))
        a = Request("a", 0.0, 300, 50, SLO(1, 0.05))
        b = Request("b", 0.0, 100, 50, SLO(1, 0.05))
        inst.add(a, 0.0)
        inst.add(b, 0.0)
        inst.step(0.0)
        assert alloc.num_free < 100
        inst.abort("a", 0.1)
        assert alloc.num_allocated("a") == 0 and a.finish_reason == "abort"
        now = 0.1
        while inst.has_work():
            _, res, _ = inst.step(now)
            now += res.duration
        assert b.generated == 50 and alloc.num_free == 100
        assert inst.abort("missing", now) is None


def test_prompt_longer_than_context_is_rejected_clearly() -> None:
    sched = make_scheduler("vllm", SchedulerConfig(max_model_len=256), BlockAllocator(100), MODEL)
    with pytest.raises(ValueError, match="exceeds the context limit"):
        sched.add(Request("long", 0.0, 300, 5, SLO(1, 0.05)), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        sched.add(Request("x", 0.0, 10, 5, SLO(1, 0.05)), 0.0)
        sched.add(Request("x", 0.0, 10, 5, SLO(1, 0.05)), 0.0)


def test_output_is_cut_to_the_context_before_the_kv_check() -> None:
    # kv.check_fits, the check of the scheduler, the engine and the server alike
    sched = make_scheduler("vllm", SchedulerConfig(max_model_len=256), BlockAllocator(16, 16), MODEL)
    req = Request("r", 0.0, 100, 10_000, SLO(1, 0.05))
    sched.add(req, 0.0)                     # 256 tokens once cut: 16 blocks, all of the cache
    assert req.max_new_tokens == 156
    sched = make_scheduler("vllm", SchedulerConfig(max_model_len=512), BlockAllocator(16, 16), MODEL)
    with pytest.raises(ValueError, match="request s: a request of 200 \\+ 72 tokens needs 17 KV blocks"):
        sched.add(Request("s", 0.0, 200, 72, SLO(1, 0.05)), 0.0)


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="fairbatching"):
        make_scheduler("nope", SchedulerConfig(), BlockAllocator(10), MODEL)


@pytest.mark.parametrize("policy", policy_names())
def test_kv_pressure_preempts_and_recomputes(policy: str) -> None:
    """More concurrent demand than KV: requests are preempted, recomputed, and all finish
    with exactly their output length and no leaked blocks."""
    alloc = BlockAllocator(40, 16)     # 640 token slots
    cfg = SchedulerConfig(max_num_batched_tokens=512, max_model_len=1024,
                          chunk_size=256 if policy == "sarathi" else None)
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    reqs = [Request(f"r{i}", 0.01 * i, 100 + 20 * i, 150, SLO(1.0, 0.05)) for i in range(8)]
    out = simulate(reqs, [Instance(sched, CheckingExecutor(MODEL, sched))])
    assert out.unfinished == 0
    assert out.preemptions > 0
    assert sum(r.num_preemptions for r in reqs) == out.preemptions
    assert all(r.generated == 150 for r in reqs)
    assert alloc.num_free == 40


def test_latency_model_changed_rederives_policy_values():
    """A refitted step-time model reaches what policies computed from it at construction."""
    from fairbatch.latency.linear import LinearLatencyModel
    from fairbatch.latency.online import OnlineLatencyModel
    from fairbatch.kv import BlockAllocator
    from fairbatch.scheduler import SchedulerConfig, make_scheduler

    fast = LinearLatencyModel(0.005, 1e-5, 0.0, 0.0, 0.0)
    slow = LinearLatencyModel(0.005, 4e-5, 0.0, 0.0, 0.0)
    online = OnlineLatencyModel(fast)
    sarathi = make_scheduler("sarathi", SchedulerConfig(tpot_slo=0.05), BlockAllocator(1000, 16), online)
    fb = make_scheduler("fairbatching", SchedulerConfig(), BlockAllocator(1000, 16), online)
    budget, rate = sarathi.token_budget, fb._prefill_rate
    online.current = slow
    sarathi.latency_model_changed()
    fb.latency_model_changed()
    assert sarathi.token_budget < budget and fb._prefill_rate < rate
