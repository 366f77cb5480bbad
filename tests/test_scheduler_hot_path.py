"""The scheduler's per-step bookkeeping with prefix caching: waiting prompts keep the order
of their current work left when a cached prefix is given back, the heap of waiting
prompts stays proportional to them, and naming computed blocks asks the allocator only for
requests that computed something since, while naming exactly what asking for every
request did."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator, trace_block_hashes
from fairbatch.plan import StepResult
from fairbatch.prefix_cache import CachingBlockAllocator
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.scheduler.prefix_reuse import PrefixReuse
from fairbatch.scheduler.prompt_heap import PromptHeap
from fairbatch.sim import SimExecutor, simulate

from test_prefix_cache_scheduler import TRACE_BLOCK, _requests, sessions
from test_scheduler_properties import MODEL


def _step(sched, now: float) -> list[Request]:
    """One step at ``now``: the requests it ran, in plan order."""
    plan = sched.schedule(now)
    sched.on_step_end(plan, StepResult(duration=MODEL.predict(plan.features)), now)
    return [r for r, _ in plan.chunks]


@pytest.mark.parametrize("policy", ["fairbatching", "qoserve"])
def test_a_given_back_prefix_reorders_the_waiting_prompt(policy: str) -> None:
    """Both policies order waiting prompts by deadline + 0.008 s per prompt token left
    (FairBatching with late=serve). ``a`` waits holding a 64-token cached prefix (1 token
    left: ahead of ``b``'s 40); ``c`` needs every block, so ``a`` gives its prefix back
    and all of it is evicted: ``a`` now has 65 tokens left and goes after ``b``."""
    alloc = BlockAllocator(8, 16, prefix_caching=True)
    cfg = SchedulerConfig(max_model_len=128, max_num_seqs=1, late="serve")
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    warm = Request("warm", 0.0, 65, 1, SLO(1.0, 0.05))
    warm.block_hashes = trace_block_hashes([7], 65, 16, TRACE_BLOCK)
    simulate([warm], [Instance(sched, SimExecutor(MODEL))])
    now = 1.0
    c = Request("c", now, 120, 1, SLO(0.1, 0.05))     # earliest deadline: admitted first
    a = Request("a", now, 65, 1, SLO(5.0, 0.05))
    a.block_hashes = trace_block_hashes([7], 65, 16, TRACE_BLOCK)
    b = Request("b", now, 40, 1, SLO(5.0, 0.05))
    for r in (c, a, b):
        sched.add(r, now)
    assert a.num_computed == 64
    assert _step(sched, now) == [c]          # c takes all 8 blocks: a's prefix is evicted
    assert a.num_computed == 0 and alloc.num_cached == 0
    assert _step(sched, now + 0.1) == [b]    # c finished; one sequence at a time
    assert _step(sched, now + 0.2) == [a]
    alloc.check_invariants()


def test_waiting_prompts_in_key_order_once_each() -> None:
    """A prompt pushed again appears once, under its newest key; prompts that left are
    skipped; the heap sheds its stale entries once they outnumber the live ones."""
    reqs = [Request(f"r{i}", 0.0, 100, 1, SLO(1.0, 0.05)) for i in range(40)]
    key = {r.request_id: float(i) for i, r in enumerate(reqs)}
    heap = PromptHeap(lambda r: key[r.request_id])
    for r in reqs:
        heap.push(r)
    key["r0"] = 100.0
    heap.rekey(reqs[0])                      # now last
    for r in reqs[1:31]:
        r.state = RequestState.RUNNING       # admitted: their entries go stale
    assert heap.waiting() == reqs[31:] + [reqs[0]]
    assert len(heap) == 10                   # 31 stale of 41 entries: dropped
    assert heap.head() is reqs[31]


def test_the_request_entered_first_names_a_block_both_computed() -> None:
    """Two running requests complete the same block in one step: the one entered first
    names its copy; one preempted and admitted again before the next naming keeps its
    place."""
    alloc = CachingBlockAllocator(16, 16)
    reuse = PrefixReuse(alloc, lambda req: None)
    names = trace_block_hashes([5], 64, 16, TRACE_BLOCK)
    a, b = Request("a", 0.0, 64, 1, SLO(1.0, 0.05)), Request("b", 0.0, 64, 1, SLO(1.0, 0.05))
    for r in (a, b):
        r.block_hashes = names
        alloc.allocate(r.request_id, 64)
        r.state = RequestState.RUNNING
        reuse.admitted(r)
    alloc.free("a")                          # a is preempted, then admitted again
    a.state = RequestState.WAITING
    alloc.allocate("a", 64)
    a.state = RequestState.RUNNING
    reuse.admitted(a)
    a.num_computed = b.num_computed = 16
    reuse.name_computed_blocks()
    assert alloc.cached_blocks(names) == 1
    assert alloc._by_name[names[0]] == alloc.block_table("a")[0]


# The naming before it skipped the requests that computed nothing since, kept as the
# reference: the allocator is asked for every entered request after every step.
def _entered(self: PrefixReuse, req: Request) -> None:
    self.pinned.pop(req.request_id, None)
    self.naming[req.request_id] = req
    if req.admitted_at < 0:
        req.num_cached_tokens = req.num_computed
        self.allocator.record_lookup(req.prompt_len, req.num_computed)


def _full_scan(self: PrefixReuse) -> None:
    register, bs = self.allocator.register, self.allocator.block_size
    for rid, req in list(self.naming.items()):
        if req.state is RequestState.RUNNING:
            register(rid, req.block_hashes, req.num_computed)
            if req.num_computed < len(req.block_hashes) * bs:
                continue
        del self.naming[rid]


class _NamingLog(CachingBlockAllocator):
    """Records every block named: which request named which name, to which block."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, int, int]] = []

    def register(self, request_id, block_hashes, num_computed) -> None:
        before = set(self._by_name)
        super().register(request_id, block_hashes, num_computed)
        for h in set(self._by_name) - before:
            self.log.append((request_id, h, self._by_name[h]))


# bursts of requests opening with the same prefixes, so that several compute the same
# block in one step and the first entered names its copy
bursts = st.lists(
    st.tuples(st.sampled_from([0.0, 0.0, 0.3, 1.0]), st.integers(64, 400), st.integers(1, 40),
              st.sampled_from([(1.0, 0.05), (4.0, 0.2)])),
    min_size=10, max_size=40)


def _run(policy: str, spec, sess, num_blocks: int, budget: int, late: str):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=512,
                          chunk_size=min(budget, 256) if policy == "sarathi" else None, late=late)
    alloc = _NamingLog(num_blocks, 16)
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    reqs = [r for r in _requests(spec, sess) if alloc.blocks_for(r.prompt_len + r.max_new_tokens) <= num_blocks]
    simulate(reqs, [Instance(sched, SimExecutor(MODEL))])
    return alloc.log, [(r.request_id, r.state, r.finish_time, r.num_cached_tokens, r.num_preemptions) for r in reqs]


@pytest.mark.parametrize("policy", policy_names())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=bursts, sess=sessions, num_blocks=st.integers(32, 120), budget=st.sampled_from([256, 2048]),
       late=st.sampled_from(["serve", "relegate", "reject"]))
def test_naming_only_what_moved_names_what_asking_for_all_named(policy: str, spec, sess, num_blocks: int,
                                                                  budget: int, late: str) -> None:
    """Same blocks named, by the same requests, in the same order, and the same results,
    as visiting every request with blocks to name after every step; KV short enough that
    requests are preempted and come back."""
    got = _run(policy, spec, sess, num_blocks, budget, late)
    with pytest.MonkeyPatch.context() as mp:
        for name, old in (("admitted", _entered), ("name_computed_blocks", _full_scan)):
            mp.setattr(PrefixReuse, name, old)
        want = _run(policy, spec, sess, num_blocks, budget, late)
    assert got == want
