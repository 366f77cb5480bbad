"""Piecewise CUDA graphs on the GPU (``-m gpu``; skipped without CUDA): replayed pieces
with eager attention between them against the eager forward, in bf16, over several
buckets, for steps of decodes + prefill chunks + continuation chunks; prefix-cached
prompts end to end; the whole-step graphs still win the steps they cover.
NOT yet run on a GPU (written 2026-12-07 without one): see docs/PERFORMANCE.md."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUCKETS = (384, 512, 768, 1024)
BF16_TOL = 5e-3     # relative to the logits' norm; GEMMs of other row counts round differently


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from test_engine_support import write_checkpoint

    return write_checkpoint("tiny-qwen3", tmp_path_factory.mktemp("gpu-piecewise"))


def _engine(path, **kw):
    from fairbatch.engine.llm import Engine, EngineArgs

    kw.setdefault("dtype", "bfloat16")
    return Engine(EngineArgs(str(path), device="cuda", num_kv_blocks=1024, max_num_seqs=64, **kw))


def _piecewise_then_eager(ex, plan):
    """The plan's logits through the piecewise graphs, then eagerly (which rewrites the
    same KV slots, so later steps read the eager path's cache either way)."""
    pw = ex.piecewise
    before = pw.replays
    got = ex.logits_of_all_tokens(plan)
    assert pw.replays == before + 1
    ex.piecewise = None
    try:
        want = ex.logits_of_all_tokens(plan)
    finally:
        ex.piecewise = pw
    return got, want


def test_piecewise_equals_eager_over_buckets(tiny_ckpt):
    from fairbatch.engine.piecewise_graph import CudaGraphPieces, PiecewiseGraphs
    from fairbatch.plan import StepPlan
    from fairbatch.request import SLO, Request

    e = _engine(tiny_ckpt)
    ex = e.executor
    ex.piecewise = PiecewiseGraphs(e.model, e.kv, e.backend, e.ops, BUCKETS, CudaGraphPieces(e.device))
    ex.piecewise.capture_all()
    assert len(ex.piecewise.capture.graphs) == len(BUCKETS) * (e.config.num_layers + 1)
    rng = random.Random(0)
    seen = set()
    for trial in range(10):
        chunks = []
        target = rng.choice([300, 384, 450, 512, 700, 1000, 1024])
        total = 0
        i = 0
        while total < target:
            n = rng.randint(2, 700)
            r = Request(f"t{trial}-{i}", 0.0, n, 4, SLO(1, 1), prompt_token_ids=[rng.randrange(512) for _ in range(n)])
            i += 1
            c = rng.randint(0, n - 1)                    # c > 0: a continuation chunk over cached context
            if c:
                e.allocator.allocate(r.request_id, c)
                p = StepPlan()
                p.add(r, c)
                ex.piecewise, saved = None, ex.piecewise
                ex.logits_of_all_tokens(p)
                ex.piecewise = saved
                r.num_computed = c
            k = min(rng.choice([1, 1, n - c, max(1, (n - c) // 2)]), target - total)
            e.allocator.allocate(r.request_id, c + k)
            chunks.append((r, k))
            total += k
        plan = StepPlan()
        for r, k in chunks:
            plan.add(r, k)
        got, want = _piecewise_then_eager(ex, plan)
        assert torch.isfinite(got).all()
        assert _rel(got, want) < BF16_TOL, (trial, total)
        seen.add(ex.piecewise.bucket_for(total))
        for r, _ in chunks:
            ex.release(r)
            e.allocator.free(r.request_id)
    assert len(seen) >= 3 and e.allocator.num_free == e.allocator.num_blocks


def test_engine_option_generates_like_eager_with_prefix_cache(tiny_ckpt):
    """End to end: --piecewise-cuda-graphs on, float32 (so greedy tokens are comparable),
    prompts over 256 tokens sharing a cached prefix of 320 tokens; same tokens as the
    engine without it, and the piecewise graphs did run."""
    from fairbatch.engine.llm import LLM
    from fairbatch.engine.params import SamplingParams

    rng = random.Random(1)
    base = [rng.randrange(512) for _ in range(320)]
    prompts = [base + [rng.randrange(512) for _ in range(n)] for n in (40, 200, 333)]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = {}
    for on in (False, True):
        llm = LLM(str(tiny_ckpt), dtype="float32", device="cuda", num_kv_blocks=256, max_num_seqs=16,
                  max_num_batched_tokens=1024, piecewise_cuda_graphs=on)
        ex = llm.engine.executor
        assert (ex.piecewise is not None) == on
        llm.generate([prompts[0]], sp)                     # caches base's blocks
        done = llm.generate(prompts[1:], sp)
        assert [o.num_cached_tokens for o in done] == [320, 320]       # continuation chunks
        outs[on] = [o.token_ids for o in done]
        if on:
            assert ex.piecewise.replays > 0
            assert set(ex.piecewise.pieces) == set(ex.piecewise.buckets)   # all captured at start
    assert outs[True] == outs[False]


def test_whole_step_graphs_come_first(tiny_ckpt):
    from fairbatch.plan import StepPlan
    from fairbatch.request import SLO, Request

    e = _engine(tiny_ckpt, piecewise_cuda_graphs=True, max_num_batched_tokens=512)
    ex = e.executor
    assert ex.piecewise.buckets == (256, 384, 512)
    r = Request("small", 0.0, 100, 4, SLO(1, 1), prompt_token_ids=list(range(100)))
    e.allocator.allocate("small", 100)
    plan = StepPlan()
    plan.add(r, 100)
    ex.execute(plan)                                      # 100 tokens: the whole-step mixed graph
    assert ex.graphs.mixed_replays == 1 and ex.piecewise.replays == 0
    ex.release(r)
    e.allocator.free("small")
    r = Request("big", 0.0, 400, 4, SLO(1, 1), prompt_token_ids=[i % 512 for i in range(400)])
    e.allocator.allocate("big", 400)
    plan = StepPlan()
    plan.add(r, 400)
    ex.execute(plan)                                      # 400 tokens: piecewise, bucket 512
    assert ex.graphs.mixed_replays == 1 and ex.piecewise.replays == 1
