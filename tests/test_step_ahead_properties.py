"""Property test of scheduling one step ahead (``step_ahead.py``): every policy, random small
workloads with stop tokens, a KV cache small enough to preempt, shared prompt prefixes and
aborts between cycles. The executor runs no model but builds every step's inputs with the
engine's real batch builder and checks them token by token after the in-flight ids are
filled in; request i's output token j is a fixed function of (i, j), so any token out of
place shows. The same workload through the plain loop must end the same way."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

import torch  # noqa: E402

from fairbatch.engine.attention.torch_ref import TorchAttention  # noqa: E402
from fairbatch.engine.batch import BatchBuilder  # noqa: E402
from fairbatch.engine.params import SamplingParams, prefix_cache_hashes  # noqa: E402
from fairbatch.instance import Instance  # noqa: E402
from fairbatch.kv import BlockAllocator  # noqa: E402
from fairbatch.latency.linear import LinearLatencyModel  # noqa: E402
from fairbatch.plan import StepPlan, StepResult  # noqa: E402
from fairbatch.request import SLO, Request, RequestState  # noqa: E402
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names  # noqa: E402
from fairbatch.step_ahead import StepAhead  # noqa: E402

MODEL = LinearLatencyModel(a=0.005, b=4e-5, c=2e-7, d=1e-10, e=2e-5)
BLOCK = 4


def token(i: int, j: int) -> int:
    """Request i's output token j."""
    return (i * 31 + j * 7) % 97 + 3


class Clock:
    t = 0.0


class TokenCheckingExecutor:
    """An ``OverlappingExecutor`` on a manual clock: a step lasts what ``MODEL`` predicts."""

    def __init__(self, allocator: BlockAllocator, clock: Clock, index: dict[str, int]) -> None:
        self.builder = BatchBuilder(allocator, TorchAttention(1, 1, 8), torch.device("cpu"))
        self.clock = clock
        self.index = index
        self.launched_pending = 0

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(self.prepare(plan)))

    def prepare(self, plan: StepPlan):   # noqa: ANN201
        pending: list = []
        arrays, reqs, _, _ = self.builder.host_arrays(plan, pending)
        return plan, arrays, pending, reqs

    def launch(self, prepared):   # noqa: ANN001, ANN201
        plan, arrays, pending, reqs = prepared
        ids = arrays["input_ids"]
        for i, req, j in pending:
            ids[i] = req.output_token_ids[j]
        self.launched_pending += len(pending)
        row = 0
        for req, k in plan.chunks:
            n = self.index[req.request_id]
            for pos in arrays["positions"][row:row + k].tolist():
                want = req.prompt_token_ids[pos] if pos < req.prompt_len else token(n, pos - req.prompt_len)
                assert ids[row] == want, f"{req.request_id}: input at position {pos} is {ids[row]}, not {want}"
                row += 1
        tokens, stopped = {}, set()
        seq_lens = dict(zip((r.request_id for r, _ in plan.chunks), arrays["seq_lens"].tolist()))
        for req in reqs:
            rid = req.request_id
            tok = token(self.index[rid], seq_lens[rid] - req.prompt_len)
            tokens[rid] = tok
            if tok in req.sampling.stop_token_ids:
                stopped.add(rid)
        return self.clock.t, MODEL.predict(plan.features), StepResult(0.0, tokens, stopped)

    def collect(self, launched) -> StepResult:   # noqa: ANN001
        start, duration, result = launched
        self.clock.t = max(self.clock.t, start + duration)
        result.duration = duration
        return result

    def release(self, req: Request) -> None:
        self.builder.release(req)


def build(policy: str, specs: list, num_blocks: int, ttft: float = 100.0, late: str = "relegate"
          ) -> tuple[Instance, list[Request], Clock, TokenCheckingExecutor]:
    alloc = BlockAllocator(num_blocks, BLOCK, prefix_caching=True)
    cfg = SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=6, max_model_len=num_blocks * BLOCK, late=late)
    sched = make_scheduler(policy, cfg, alloc, MODEL)
    clock = Clock()
    reqs = []
    for i, (prompt, max_tokens, stop) in enumerate(specs):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            stop_token_ids=[token(i, stop)] if stop is not None else [])
        r = Request(f"r{i}", 0.0, len(prompt), max_tokens, SLO(ttft, 10.0), prompt_token_ids=prompt, sampling=sp)
        r.block_hashes = prefix_cache_hashes(prompt, sp, BLOCK, True)
        reqs.append(r)
    ex = TokenCheckingExecutor(alloc, clock, {r.request_id: i for i, r in enumerate(reqs)})
    inst = Instance(sched, ex)
    for r in reqs:
        inst.add(r, 0.0)
    return inst, reqs, clock, ex


def run(inst: Instance, clock: Clock, aborts: dict[int, list[str]], ahead: bool) -> None:
    stepper = StepAhead(inst, lambda: clock.t) if ahead else None
    for cycle in range(5000):
        if not (inst.has_work() or (stepper is not None and stepper.in_flight)):
            return
        for rid in aborts.get(cycle, ()):
            inst.abort(rid, clock.t)
        if stepper is not None:
            stepper.cycle(clock.t)
        else:
            inst.step(clock.t)
    raise AssertionError("no progress")


def check(reqs: list[Request], inst: Instance) -> dict[str, tuple]:
    ends = {}
    for i, r in enumerate(reqs):
        out = list(r.output_token_ids)
        assert out == [token(i, j) for j in range(len(out))], f"{r.request_id}: tokens out of place"
        assert len(out) == r.generated == len(r.token_times)
        assert list(r.token_times) == sorted(r.token_times)
        stops = set(r.sampling.stop_token_ids)
        if r.state is RequestState.FINISHED:
            if r.finish_reason == "length":
                assert r.generated == r.max_new_tokens and not stops & set(out[:-1])
            else:
                assert r.finish_reason == "stop" and out[-1] in stops and not stops & set(out[:-1])
        elif r.state is RequestState.REJECTED:         # late=reject: refused before its first token
            assert not out
        else:
            assert r.state is RequestState.ABORTED and not stops & set(out), r
        ends[r.request_id] = (r.state, r.finish_reason, tuple(out))
    alloc = inst.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks, "KV blocks leaked"
    st_ = inst.scheduler.stats
    assert st_.finished + st_.aborted + st_.rejected == len(reqs)
    return ends


SHARED = list(range(200, 212))       # three blocks some prompts start with


@st.composite
def workloads(draw):
    n = draw(st.integers(2, 8))
    specs = []
    for i in range(n):
        own = draw(st.lists(st.integers(1, 150), min_size=1, max_size=30))
        prompt = SHARED + own if draw(st.booleans()) else own
        max_tokens = draw(st.integers(1, 14))
        stop = draw(st.one_of(st.none(), st.integers(0, max_tokens - 1)))
        specs.append((prompt, max_tokens, stop))
    aborts: dict[int, list[str]] = {}
    for _ in range(draw(st.integers(0, 2))):
        aborts.setdefault(draw(st.integers(0, 20)), []).append(f"r{draw(st.integers(0, n - 1))}")
    return specs, aborts


@pytest.mark.parametrize("policy", policy_names())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(work=workloads(), num_blocks=st.integers(14, 40), ttft=st.sampled_from([0.03, 0.3, 100.0]),
       late=st.sampled_from(["serve", "relegate", "reject"]))
def test_one_step_ahead_keeps_every_token_in_place(policy, work, num_blocks, ttft, late):
    """Tight TTFTs too: relegation and rejection decided on settled token times."""
    specs, aborts = work
    inst, reqs, clock, ex = build(policy, specs, num_blocks, ttft, late)
    run(inst, clock, aborts, ahead=True)
    ahead = check(reqs, inst)

    inst, reqs, clock, _ = build(policy, specs, num_blocks, ttft, late)
    run(inst, clock, aborts, ahead=False)
    plain = check(reqs, inst)
    aborted = {rid for rids in aborts.values() for rid in rids}
    for rid, end in plain.items():
        if rid not in aborted and end[0] is RequestState.FINISHED and ahead[rid][0] is RequestState.FINISHED:
            assert ahead[rid] == end, rid     # same tokens, same finish, whatever the plans did


@pytest.mark.parametrize("policy", policy_names())
def test_back_to_back_decodes_launch_with_their_input_in_flight(policy):
    """The case the property test is about, for certain: a lone request's decodes each
    take as input the token the step before is still producing."""
    inst, reqs, clock, ex = build(policy, [(list(range(1, 10)), 6, None)], 20)
    run(inst, clock, {}, ahead=True)
    check(reqs, inst)
    assert ex.launched_pending == 5          # every decode after the prefill
