"""Our engine's logits equal transformers' reference forward on the same weights: full
prefill, chunked prefill at several chunk sizes, mixed prefill+decode steps, and after a
preemption and recompute; greedy generations identical token for token."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_engine_support import hf_greedy, hf_logits, hf_model, write_checkpoint

from fairbatch.engine.llm import LLM, Engine, EngineArgs
from fairbatch.engine.params import SamplingParams
from fairbatch.plan import StepPlan
from fairbatch.request import SLO, Request

VARIANTS = ["tiny-llama", "tiny-qwen3", "tiny-llama31", "tiny-qwen2"]
TOL = 2e-4   # fp32 relative to the logits' scale


@pytest.fixture(scope="module", params=VARIANTS)
def setup(request, tmp_path_factory):
    name = request.param
    path = write_checkpoint(name, tmp_path_factory.mktemp(name),
                            max_shard_bytes=200_000 if name == "tiny-qwen3" else None)
    engine = Engine(EngineArgs(str(path), dtype="float32", num_kv_blocks=48))
    return name, path, engine, hf_model(path)


def _req(rid: str, ids: list[int], prompt_len: int | None = None) -> Request:
    """A request whose known tokens are ``ids``: the first ``prompt_len`` as prompt, the
    rest as already generated output (so decodes read output tokens, as in serving)."""
    p = prompt_len or len(ids)
    r = Request(rid, 0.0, p, 64, SLO(1.0, 1.0), prompt_token_ids=ids[:p])
    r.output_token_ids = list(ids[p:])
    r.generated = len(ids) - p
    return r


def _run(engine: Engine, steps: list[list[tuple[Request, int]]]) -> dict[tuple[str, int], torch.Tensor]:
    """Execute steps of (request, k); returns logits by (request id, position)."""
    out = {}
    for chunks in steps:
        plan = StepPlan()
        for req, k in chunks:
            assert engine.allocator.allocate(req.request_id, req.num_computed + k)
            plan.add(req, k)
        logits = engine.executor.logits_of_all_tokens(plan)
        row = 0
        for req, k in chunks:
            for j in range(k):
                out[(req.request_id, req.num_computed + j)] = logits[row + j]
            row += k
            req.num_computed += k
    return out


def _check(got: dict, refs: dict[str, torch.Tensor]) -> None:
    assert got
    for (rid, pos), row in got.items():
        ref = refs[rid][pos]
        err = (row - ref).abs().max().item() / ref.abs().max().item()
        assert err < TOL, f"{rid} position {pos}: relative error {err:.2e}"


def _free(engine: Engine, *reqs: Request) -> None:
    for r in reqs:
        engine.executor.release(r)
        engine.allocator.free(r.request_id)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    engine.allocator.check_invariants()


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def test_full_prefill(setup):
    _, _, engine, hf = setup
    ids = _ids(53, 1)
    req = _req("a", ids)
    got = _run(engine, [[(req, len(ids))]])
    _check(got, {"a": hf_logits(hf, ids)})
    _free(engine, req)


@pytest.mark.parametrize("chunk", [1, 7, 16, 33])
def test_chunked_prefill(setup, chunk):
    _, _, engine, hf = setup
    ids = _ids(70, 2)
    req = _req("a", ids)
    steps = [[(req, min(chunk, len(ids) - s))] for s in range(0, len(ids), chunk)]
    _check(_run(engine, steps), {"a": hf_logits(hf, ids)})
    _free(engine, req)


def test_mixed_prefill_and_decode_steps(setup):
    """Decodes (reading output tokens) batched with prefill chunks of other requests that
    straddle block boundaries, in varying orders."""
    _, _, engine, hf = setup
    seqs = {"d1": _ids(40, 3), "d2": _ids(21, 4), "p1": _ids(45, 5), "p2": _ids(17, 6)}
    d1, d2 = _req("d1", seqs["d1"], 30), _req("d2", seqs["d2"], 16)
    p1, p2 = _req("p1", seqs["p1"]), _req("p2", seqs["p2"], 12)
    steps = [
        [(d1, 30), (d2, 16)],                  # prompts of the decoding requests
        [(d1, 1), (p1, 13), (d2, 1)],
        [(p1, 19), (d1, 1), (p2, 5), (d2, 1)],
        [(d2, 1), (d1, 1), (p1, 13), (p2, 12)],
        [(d1, 1), (d2, 1)],
        [(d1, 1), (d2, 1)],
        [(d1, 1)], [(d1, 1)], [(d1, 1)], [(d1, 1)], [(d1, 1)],
    ]
    got = _run(engine, steps)
    assert d1.num_computed == 40 and d2.num_computed == 21 and p1.num_computed == 45 and p2.num_computed == 17
    _check(got, {rid: hf_logits(hf, ids) for rid, ids in seqs.items()})
    _free(engine, d1, d2, p1, p2)


def test_recompute_after_preemption(setup):
    """A request is preempted (its blocks freed and overwritten by another request), then
    recomputed from scratch, prompt and generated tokens alike, in chunks."""
    _, _, engine, hf = setup
    a_ids, b_ids = _ids(50, 7), _ids(60, 8)
    a = _req("a", a_ids, 35)
    _run(engine, [[(a, 20)], [(a, 15)], [(a, 1)], [(a, 1)]])
    engine.executor.release(a)
    engine.allocator.free("a")
    a.reset_for_recompute()
    b = _req("b", b_ids)
    got_b = _run(engine, [[(b, 60)]])                       # reuses a's freed blocks first
    got = _run(engine, [[(a, 24)], [(a, 13)], [(a, 1)], [(a, 1)]])
    assert a.num_computed == 39
    _check(got, {"a": hf_logits(hf, a_ids)})
    _check(got_b, {"b": hf_logits(hf, b_ids)})
    _free(engine, a, b)


def test_greedy_generation_matches_transformers(setup):
    _, path, _, hf = setup
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    prompts = [_ids(n, 10 + n) for n in (5, 23, 40)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 24)
        assert o.finish_reason == "length"
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks
