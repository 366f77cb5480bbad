"""Scheduling one step ahead (``--async-scheduling``, server/engine_loop_overlap.py) serves
exactly what the plain loop serves: the same tokens, finish reasons and logprobs per request,
through stops that land while the next step is already planned, preemptions, prefix hits,
seeded sampling and penalties (which read the tokens of the step still in flight), on the
real CPU engine. The scheduler's two-part step end is checked on its own below."""

from __future__ import annotations

import pytest

from fairbatch.engine.llm import LLM
from fairbatch.engine.params import SamplingParams
from fairbatch.engine.simulated import SimulatedExecutor
from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepResult
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler.base import make_scheduler
from fairbatch.scheduler.config import SchedulerConfig
from fairbatch.server.engine_loop import EngineLoop
from fairbatch.server.engine_loop_overlap import OverlappedEngineLoop, make_engine_loop
from fairbatch.step_ahead import require_overlap
from fairbatch.server.engine_messages import AbortRequests, AddRequests, StepDeltas


def _llm(num_kv_blocks: int = 64, policy: str = "sarathi") -> LLM:
    """Sarathi: its plans do not depend on the clock, so both loops form the same steps
    (the same batches, hence the same float32 sums); FairBatching's plans follow the time
    left to deadlines, and the scheduler-level tests below cover it on a manual clock."""
    return LLM("tiny-llama", load_format="dummy", dtype="float32", num_kv_blocks=num_kv_blocks, policy=policy,
               max_num_batched_tokens=64)


def _requests(llm: LLM, specs: list[tuple[list[int], SamplingParams]]) -> list[Request]:
    return [llm.make_request(p, sp, request_id=f"r{i}", slo=SLO(60.0, 5.0)) for i, (p, sp) in enumerate(specs)]


def _serve(llm: LLM, reqs: list[Request], *, overlap: bool, abort_after: dict[str, int] | None = None
           ) -> dict[str, dict]:
    """Every request through an engine loop (added at once); per request its streamed
    tokens, finish reason and logprobs. ``abort_after``: request id -> abort it once it
    has streamed that many tokens."""
    posted: list = []
    loop = make_engine_loop(llm.instance, posted.append, async_scheduling=overlap, idle_wait=0.001)
    assert isinstance(loop, OverlappedEngineLoop) is overlap
    out: dict[str, dict] = {r.request_id: {"tokens": [], "reason": None, "logprobs": []} for r in reqs}
    abort_after = dict(abort_after or {})
    state = {"added": False, "seen": 0}

    def drain() -> list:
        cmds = []
        for msg in posted[state["seen"]:]:
            if not isinstance(msg, StepDeltas):
                continue
            for rid, d in msg.deltas:
                o = out[rid]
                assert d.start == len(o["tokens"]), f"{rid}: tokens out of order"
                o["tokens"] += d.token_ids
                o["logprobs"] += d.logprobs or []
                if d.finish_reason is not None:
                    o["reason"] = d.finish_reason
                if rid in abort_after and len(o["tokens"]) >= abort_after[rid] and o["reason"] is None:
                    del abort_after[rid]
                    o["reason"] = "aborted"
                    cmds.append(AbortRequests((rid,)))
        state["seen"] = len(posted)
        return cmds

    def receive(timeout: float) -> list:
        if not state["added"]:
            state["added"] = True
            return [AddRequests(tuple(reqs))]
        return drain()

    loop.run(receive, stopping=lambda: state["added"] and all(o["reason"] for o in out.values()))
    drain()
    assert loop.step_errors == 0
    assert not llm.instance.has_work()
    return out


def _both(make, specs, **kw) -> tuple[dict, dict, LLM, LLM]:
    a, b = make(), make()
    sync = _serve(a, _requests(a, specs), overlap=False, **kw)
    ahead = _serve(b, _requests(b, specs), overlap=True, **kw)
    return sync, ahead, a, b


PROMPTS = [[(7 * i + 3 * j) % 200 + 1 for j in range(n)] for i, n in enumerate((5, 17, 33, 40, 9, 64, 21))]


def test_greedy_outputs_match_the_plain_loop():
    specs = [(p, SamplingParams(temperature=0.0, max_tokens=3 + 4 * i, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    sync, ahead, _, b = _both(_llm, specs)
    assert ahead == sync
    assert all(o["reason"] == "length" for o in ahead.values())
    assert b.engine.executor.steps > 0


def test_a_stop_token_sampled_while_the_next_step_is_planned():
    """Each request stops at a token the plain loop's run shows it samples mid-way: the
    overlapped loop has by then planned (and runs) the next step with that request in
    it; the extra token is never streamed."""
    greedy = [(p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)) for p in PROMPTS]
    probe = _llm()
    first = _serve(probe, _requests(probe, greedy), overlap=False)
    specs = [(p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                stop_token_ids=[first[f"r{i}"]["tokens"][2 + i % 4]]))
             for i, p in enumerate(PROMPTS)]
    sync, ahead, _, b = _both(_llm, specs)
    assert ahead == sync
    assert sum(o["reason"] == "stop" for o in ahead.values()) == len(PROMPTS)
    assert b.engine.executor._stops == {}        # nothing kept for the stopped ones


def test_preemption_prefix_hits_seeds_and_penalties_match():
    """A KV cache too small for everything (recompute preemptions, some while a token is in
    flight), shared prefixes, seeded random sampling and penalties (which read the output
    tokens, including the one the last step just sampled)."""
    shared = list(range(1, 49))
    specs = []
    for i, p in enumerate(PROMPTS):
        prompt = shared + p if i % 2 else p
        sp = SamplingParams(temperature=0.9, seed=100 + i, max_tokens=20, ignore_eos=True,
                            frequency_penalty=0.5 if i % 3 == 0 else 0.0, logprobs=2 if i == 1 else None)
        specs.append((prompt, sp))
    sync, ahead, a, b = _both(lambda: _llm(num_kv_blocks=24), specs)
    assert ahead == sync
    assert a.scheduler.stats.preemptions > 0 and b.scheduler.stats.preemptions > 0
    assert b.engine.allocator.prefix_hits > 0
    assert len(ahead["r1"]["logprobs"]) == 20


def test_an_abort_while_its_token_is_in_flight():
    specs = [(p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)) for p in PROMPTS]
    sync, ahead, _, b = _both(_llm, specs, abort_after={"r2": 3, "r5": 1})
    for rid in sync:
        if rid in ("r2", "r5"):
            assert ahead[rid]["reason"] == "aborted"
            n = len(ahead[rid]["tokens"])
            assert ahead[rid]["tokens"] == sync["r2" if rid == "r2" else "r5"]["tokens"][:n]
        else:
            assert ahead[rid] == sync[rid]
    assert b.engine.allocator.num_free == b.engine.allocator.num_blocks


def test_an_executor_that_cannot_launch_ahead_is_refused():
    class Plain:
        def execute(self, plan):   # noqa: ANN001, ANN202
            return StepResult(0.0)

        def release(self, request):   # noqa: ANN001, ANN202
            pass

    sched = make_scheduler("vllm", SchedulerConfig(), BlockAllocator(64, 16), LinearLatencyModel(0.01, 0.0))
    with pytest.raises(ValueError, match="async scheduling"):
        require_overlap(Instance(sched, Plain()))
    assert type(make_engine_loop(Instance(sched, Plain()), [].append)) is EngineLoop


# --- the scheduler's two-part step end ----------------------------------------------------------

def _instance(late: str = "relegate") -> Instance:
    lat = LinearLatencyModel(0.01, 0.0)
    sched = make_scheduler("sarathi", SchedulerConfig(max_num_batched_tokens=256, late=late),
                           BlockAllocator(64, 16), lat)
    return Instance(sched, SimulatedExecutor(lat))


def _launch_one(prompt_len: int, max_tokens: int, slo: SLO, predicted_end: float):   # noqa: ANN202
    """One request on a fresh instance, its first step planned and launched."""
    inst = _instance()
    req = Request("a", 0.0, prompt_len, max_tokens, slo, prompt_token_ids=list(range(prompt_len)))
    inst.add(req, 0.0)
    plan, prepared = inst.plan_step(0.0)
    launched, finished = inst.launch_step(plan, prepared, predicted_end)
    return inst, req, plan, launched, finished


def test_advance_then_settle_is_on_step_end_with_the_real_time():
    """Tokens counted at the predicted end get the real end once collected: the first
    token's time, the TTFT verdict and the deadlines follow it."""
    inst, req, plan, launched, finished = _launch_one(20, 3, SLO(0.5, 0.05), predicted_end=0.2)
    assert not finished and req.generated == 1 and list(req.token_times) == [0.2]
    assert req.output_token_ids == []                  # the id is not known yet
    result = inst.collect_step(launched)
    assert inst.settle_step(plan, result, end=0.7) == []
    assert list(req.token_times) == [0.7] and req.first_token_time == 0.7
    assert req.ttft_missed and req.relegated           # decided on the real time, not the predicted one
    assert req.deadline == pytest.approx(req.token_deadline(1))
    assert len(req.output_token_ids) == 1


def test_a_stop_settled_after_the_next_step_was_planned():
    inst, req, plan1, run1, _ = _launch_one(8, 10, SLO(5.0, 0.5), 0.01)
    plan2, prep2 = inst.plan_step(0.01)                 # planned while step 1 runs
    assert [r for r, _ in plan2.chunks] == [req]
    result1 = inst.collect_step(run1)
    result1.stopped.add("a")                            # say step 1 sampled a stop token
    assert inst.settle_step(plan1, result1, 0.012) == [req]
    assert req.state is RequestState.FINISHED and req.finish_reason == "stop" and req.finish_time == 0.012
    run2, finished = inst.launch_step(plan2, prep2, 0.02)   # still computes its row
    assert finished == [] and req.generated == 1
    inst.settle_step(plan2, inst.collect_step(run2), 0.021)
    assert req.generated == 1 and len(req.output_token_ids) == 1 and list(req.token_times) == [0.012]
    assert inst.scheduler.allocator.num_free == inst.scheduler.allocator.num_blocks


def test_a_length_finish_is_known_at_launch():
    inst, req, plan, run, finished = _launch_one(8, 1, SLO(5.0, 0.5), 0.01)
    assert finished == [req] and req.finish_reason == "length" and not inst.has_work()
    inst.settle_step(plan, inst.collect_step(run), 0.03)
    assert req.finish_time == 0.03 and list(req.token_times) == [0.03] and len(req.output_token_ids) == 1


# --- on a GPU: whole-step graphs (double host buffers) and the device queue ----------------------

@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_on_a_gpu_the_outputs_match_the_plain_loop(graphs):
    """bf16 on a GPU: greedy outputs of the two loops are the same steps (a policy whose
    plans do not depend on the clock, no stops) on the same kernels, so they agree
    exactly; with CUDA graphs the next step is filled into a graph's other host buffer
    while the last one's copy may still be in flight."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def make() -> LLM:
        return LLM("tiny-llama", load_format="dummy", dtype="bfloat16", num_kv_blocks=256, policy="sarathi",
                   max_num_batched_tokens=128, cuda_graphs=graphs)

    specs = [(p * 3, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)) for p in PROMPTS]
    sync, ahead, a, b = _both(make, specs)
    assert ahead == sync
    if graphs:
        assert b.engine.executor.graphs.replays > 0


def test_offline_generate_one_step_ahead():
    """``LLM(..., async_scheduling=True)`` (``fairbatch generate --async-scheduling``):
    the same outputs, stop strings included (searched in each step's settled tokens)."""
    def make(ahead: bool) -> LLM:
        return LLM("tiny-llama", load_format="dummy", dtype="float32", num_kv_blocks=64, policy="sarathi",
                   max_num_batched_tokens=64, async_scheduling=ahead)

    plain = make(False)
    probe = plain.generate([PROMPTS[1], PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stop = probe[1].outputs[0].text[3:5]            # a stop string met part-way
    prompts = [[t for t in p] for p in PROMPTS]
    sps = [SamplingParams(temperature=0.0, max_tokens=6 + i, ignore_eos=True, stop=[stop] if i == 3 else [])
           for i in range(len(prompts))]
    want = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in plain.generate(prompts, sps)]
    got = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
           for o in make(True).generate(prompts, sps)]
    assert got == want
    assert want[3][2] == "stop" and stop not in want[3][1]


def test_an_abort_after_a_length_finish_still_in_flight():
    """A request that finishes by length in a launched step can still be ended by its host
    before that step is back (a stop string met in the step before): it is aborted and
    its last token, never delivered, is dropped."""
    inst, req, plan, run, finished = _launch_one(8, 1, SLO(5.0, 0.5), 0.01)
    assert finished == [req] and inst.scheduler.stats.finished == 1
    assert inst.abort("a", 0.005) is req and req.state is RequestState.ABORTED
    assert inst.settle_step(plan, inst.collect_step(run), 0.02) == []
    assert req.generated == 0 and len(req.token_times) == 0 and req.output_token_ids == []
    st = inst.scheduler.stats
    assert (st.finished, st.aborted) == (0, 1)
    assert inst.abort("a", 0.03) is None
