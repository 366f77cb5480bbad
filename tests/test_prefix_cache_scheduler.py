"""Prefix caching through the scheduler and the simulator loop: every policy, shared
prefixes, KV pressure, every ``late`` mode."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator, trace_block_hashes
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.sim import SimExecutor, simulate

from test_scheduler_properties import MODEL, SLO_CLASSES, CheckingExecutor, workloads

TRACE_BLOCK = 64     # tokens per hash id in these workloads (Mooncake's are 512)


class CacheCheckingExecutor(CheckingExecutor):
    """Also checks the allocator every step, and that no step writes a named block or
    runs a request on blocks named for another prefix."""

    def execute(self, plan: StepPlan) -> StepResult:
        alloc = self.scheduler.allocator
        alloc.check_invariants()
        bs = alloc.block_size
        for req, k in plan.chunks:
            table = alloc.block_table(req.request_id)
            names = req.block_hashes or []
            for i, b in enumerate(table):
                name = alloc._name[b]
                assert name is None or (i < len(names) and name == names[i]), "another prefix's KV"
            first, last = req.num_computed // bs, (req.num_computed + k - 1) // bs
            assert all(alloc._name[b] is None for b in table[first:last + 1]), "writes a cached block"
        return super().execute(plan)


def _hash_ids(session: int, turn_blocks: int, own: int) -> list[int]:
    """A session's shared prefix of ``turn_blocks`` ids, then ids of the request's own."""
    return [1000 * session + j for j in range(turn_blocks)] + [10**6 + 100 * own + j for j in range(8)]


# per request: its session (whose requests share a prefix), and how many blocks of that
# prefix its prompt starts with
sessions = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6)), min_size=40, max_size=40)


def _requests(spec, sessions) -> list[Request]:
    reqs = []
    for i, ((a, p, o, slo), (session, shared)) in enumerate(zip(spec, sessions)):
        r = Request(f"r{i}", a, p, o, SLO(*slo), priority=sorted(SLO_CLASSES).index(slo))
        r.block_hashes = trace_block_hashes(_hash_ids(session, shared, i), p, 16, TRACE_BLOCK)
        reqs.append(r)
    return reqs


@pytest.mark.parametrize("policy", policy_names())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=workloads, sessions=sessions, num_blocks=st.integers(32, 200), budget=st.sampled_from([64, 256, 2048]),
       late=st.sampled_from(["serve", "relegate", "reject"]))
def test_policy_invariants_with_prefix_caching(policy: str, spec, sessions, num_blocks: int, budget: int, late: str) -> None:
    """As test_scheduler_properties' invariants, with requests sharing prefixes and KV
    short enough to preempt: nothing starves, no block leaks, cached blocks are never
    written, and a request only ever reads its own prefix's blocks."""
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=512,
                          chunk_size=min(budget, 256) if policy == "sarathi" else None, late=late)
    alloc = BlockAllocator(num_blocks, 16, prefix_caching=True)
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    reqs = [r for r in _requests(spec, sessions) if alloc.blocks_for(r.prompt_len + r.max_new_tokens) <= num_blocks]
    out = simulate(reqs, [Instance(sched, CacheCheckingExecutor(MODEL, sched))])
    assert out.unfinished == 0, "a request waited forever"
    for r in reqs:
        if r.state is RequestState.REJECTED:
            assert late == "reject" and r.generated == 0
            continue
        assert r.generated == r.max_new_tokens
        assert 0 <= r.num_cached_tokens < r.prompt_len
    assert alloc.num_free == alloc.num_blocks, "KV blocks leaked"
    alloc.check_invariants()
    assert not sched._pinned
    assert alloc.prefix_hits == sum(r.num_cached_tokens for r in reqs)


class CountingExecutor(SimExecutor):
    tokens = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self.tokens += plan.num_tokens
        return super().execute(plan)


def _session(n: int, prompt: int = 1024) -> list[Request]:
    """n requests 2 s apart, each prompt the same 1,024 tokens but its last block."""
    reqs = []
    for i in range(n):
        r = Request(f"s{i}", 2.0 * i, prompt, 8, SLO(1.0, 0.05))
        r.block_hashes = trace_block_hashes(list(range(prompt // TRACE_BLOCK - 1)) + [100 + i], prompt, 16,
                                            TRACE_BLOCK)
        reqs.append(r)
    return reqs


@pytest.mark.parametrize("policy", policy_names())
def test_a_cached_prefix_is_not_computed_again(policy: str) -> None:
    cfg = SchedulerConfig(max_model_len=4096)
    computed = {}
    for caching in (False, True):
        alloc = BlockAllocator(1000, 16, prefix_caching=caching)
        sched = make_scheduler(policy, cfg, alloc, MODEL)
        ex = CountingExecutor(MODEL)
        reqs = _session(4)
        simulate(reqs, [Instance(sched, ex)])
        computed[caching] = ex.tokens
        if caching:
            assert [r.num_cached_tokens for r in reqs] == [0, 960, 960, 960]
            assert (alloc.prefix_queries, alloc.prefix_hits) == (4 * 1024, 3 * 960)
        else:
            assert all(r.num_cached_tokens == 0 for r in reqs)
    assert computed[False] - computed[True] == 3 * 960


def test_pinned_waiting_prefixes_give_way() -> None:
    """KV held only by waiting requests' cached prefixes never stops admission: they give
    them back, the most recently taken first."""
    alloc = BlockAllocator(8, 16, prefix_caching=True)
    sched = make_scheduler("vllm", SchedulerConfig(max_model_len=128), alloc, MODEL)
    warm = Request("warm", 0.0, 65, 1, SLO(1.0, 0.05))
    warm.block_hashes = trace_block_hashes([7], 65, 16, TRACE_BLOCK)
    simulate([warm], [Instance(sched, SimExecutor(MODEL))])
    assert alloc.num_cached == 4
    a, b = Request("a", 0.0, 65, 1, SLO(1.0, 0.05)), Request("b", 0.0, 100, 1, SLO(1.0, 0.05))
    a.block_hashes = trace_block_hashes([7], 65, 16, TRACE_BLOCK)
    sched.add(b, 0.0)
    sched.add(a, 0.0)                  # pins 4 blocks while b waits ahead of it
    assert a.num_computed == 64 and alloc.num_free == 4
    plan = sched.schedule(0.0)         # b needs 7 blocks: a gives its prefix back
    assert [r.request_id for r, _ in plan.chunks] == ["b"]
    # three of the four were evicted, tail first; a took the head back when it was next
    # considered for admission (after b), and still waits
    assert alloc.num_cached == 1 and a.num_computed == 16 and list(sched._pinned) == ["a"]
    alloc.check_invariants()


@pytest.mark.parametrize("policy", policy_names())
def test_a_host_applying_results_names_blocks_and_reuses_them(policy: str) -> None:
    """record_tokens (a host that applies step results itself) names the prompt blocks,
    and a preempted request (requeue) takes its own prefix back at once."""
    alloc = BlockAllocator(200, 16, prefix_caching=True)
    sched = make_scheduler(policy, SchedulerConfig(max_model_len=1024, max_num_batched_tokens=1000,
                                                   chunk_size=1000 if policy == "sarathi" else None), alloc, MODEL)
    a = Request("a", 0.0, 100, 8, SLO(1.0, 0.05))
    a.block_hashes = trace_block_hashes([3, 4], 100, 16, TRACE_BLOCK)
    sched.add(a, 0.0)
    assert [r for r, _ in sched.schedule(0.0).chunks] == [a]
    a.num_computed = a.prompt_len
    sched.record_tokens(a, 1, 0.05)
    assert alloc.num_cached == 6                       # 100 tokens: 6 full blocks
    sched.requeue(a)
    assert a.state is RequestState.WAITING and a.num_computed == 96   # 101 tokens: 6 blocks reused
    plan = sched.schedule(0.1)
    assert plan.chunks == [(a, 5)] and a.num_cached_tokens == 0        # counted at its first admission
    alloc.check_invariants()


@pytest.mark.parametrize("policy", policy_names())
def test_deadline_checks_and_load_price_only_the_uncached_part(policy: str) -> None:
    """A prompt too long to meet its TTFT from scratch is accepted under late=reject when
    most of it is cached, and the load a router reads counts only its uncached tokens."""
    model = LinearLatencyModel(a=0.01, b=1e-3)          # 1 ms per prompt token
    cfg = SchedulerConfig(max_model_len=4096, late="reject")
    alloc = BlockAllocator(1000, 16, prefix_caching=True)
    sched = make_scheduler(policy, cfg, alloc, model)
    names = trace_block_hashes(list(range(32)), 2048, 16, TRACE_BLOCK)
    warm = Request("warm", 0.0, 2048, 1, SLO(60.0, 0.05))
    warm.block_hashes = names
    simulate([warm], [Instance(sched, SimExecutor(model))])
    cold, hot = Request("cold", 10.0, 2048, 4, SLO(1.0, 0.05)), Request("hot", 10.0, 2048, 4, SLO(1.0, 0.05))
    hot.block_hashes = names
    sched.add(cold, 10.0)                 # ~2 s of prefill: refused at once
    assert cold.state is RequestState.REJECTED
    sched.add(hot, 10.0)                  # 2,032 of 2,048 tokens cached: 16 to compute
    assert hot.state is RequestState.WAITING and hot.num_computed == 2032
    assert sched.load(10.0).queued_prefill_tokens == 16
    plan = sched.schedule(10.0)
    assert plan.chunks == [(hot, 16)] and hot.num_cached_tokens == 2032
