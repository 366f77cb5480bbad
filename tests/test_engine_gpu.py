"""GPU tests (``-m gpu``; skipped without CUDA): the Triton kernels against the torch
reference on random inputs of many shapes, and the whole engine on the GPU against
transformers, with and without CUDA graphs."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro"))   # engine_roofline's inputs

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _attention_case(H, KVH, D, q_lens, ctx0, dtype, seed, **options):
    """Relative error of the Triton backend against the torch reference on one random step
    (scattered blocks, block tables wider than needed; the inputs of benchmarks/micro)."""
    from engine_roofline import paged_inputs, paged_meta

    from fairbatch.engine.attention.torch_ref import TorchAttention
    from fairbatch.engine.attention.triton_paged import TritonPagedAttention

    g = torch.Generator(device="cuda").manual_seed(seed)
    q, kc, vc, seq_lens = paged_inputs(q_lens, ctx0, H, KVH, D, 16, dtype, spare_blocks=7, generator=g)
    ref, tri = TorchAttention(H, KVH, D), TritonPagedAttention(H, KVH, D, **options)
    meta = paged_meta(tri, q_lens, seq_lens, 16, num_blocks=kc.shape[0], extra_width=3, seed=seed)
    want = ref.forward(q, kc, vc, meta)
    got = tri.forward(q, kc, vc, meta)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    return _rel(got, want)


SHAPES = [
    # (H, KVH, D): MHA, GQA 2/4/7/8, MQA, head dims 64/128
    (8, 8, 64), (8, 4, 128), (32, 8, 128), (28, 4, 128), (16, 2, 64), (8, 1, 128), (64, 8, 128),
]


@pytest.mark.parametrize("H,KVH,D", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_triton_attention_matches_torch(H, KVH, D, dtype):
    dt = getattr(torch, dtype)
    tol = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}[dtype]
    rng = random.Random(H * 1000 + KVH * 10 + D)
    cases = [
        ([1], [0]),                                  # first decode of a 1-token prompt
        ([1] * 5, [15, 16, 17, 31, 32]),             # decodes around block boundaries
        ([16, 1, 33], [0, 47, 16]),                  # chunks ending exactly on boundaries
        ([300], [0]),                                # pure prefill, several query blocks
        ([129, 1, 7, 1], [1000, 2047, 5, 0]),        # ragged mix
    ]
    for _ in range(4):
        n = rng.randint(1, 12)
        q_lens = [1 if rng.random() < 0.6 else rng.randint(2, 400) for _ in range(n)]
        ctx0 = [rng.randint(0, 3000) for _ in range(n)]
        cases.append((q_lens, ctx0))
    for i, (q_lens, ctx0) in enumerate(cases):
        err = _attention_case(H, KVH, D, q_lens, ctx0, dt, seed=i)
        assert err < tol, f"case {q_lens} @ {ctx0}: relative error {err:.2e}"


@pytest.mark.parametrize("H,KVH,D", [(32, 8, 128), (28, 4, 128), (8, 1, 128)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_triton_split_kv_decode_matches_torch(H, KVH, D, dtype, monkeypatch):
    """Decodes split over several programs (split-KV) and merged give the reference result,
    with empty splits (contexts shorter than the splits), long contexts and prefills beside."""
    from fairbatch.engine.attention import triton_paged as tp

    dt = getattr(torch, dtype)
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    cases = [([1], [2047]), ([1] * 4, [0, 15, 700, 3000]), ([1, 300, 1], [5000, 0, 63]), ([1] * 3, [64, 127, 128])]
    for max_splits in (2, 8, 16):
        monkeypatch.setitem(tp.SPLIT_KV, "programs_per_sm", 1000)
        monkeypatch.setitem(tp.SPLIT_KV, "max_splits", max_splits)
        att = tp.TritonPagedAttention(H, KVH, D)
        assert att.decode_splits(4) == max_splits
        monkeypatch.setitem(tp.SPLIT_KV, "programs_per_sm", 2)   # the default: powers of two, none past 16
        assert {att.decode_splits(n) for n in range(1, 300)} <= {1, 2, 4, 8, 16}
        monkeypatch.setitem(tp.SPLIT_KV, "programs_per_sm", 1000)
        for i, (q_lens, ctx0) in enumerate(cases):
            err = _attention_case(H, KVH, D, q_lens, ctx0, dt, seed=i)
            assert err < tol, f"{max_splits} splits, case {q_lens} @ {ctx0}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("overlap,prefill", [(True, "triton"), (False, "sdpa"), (True, "sdpa")])
def test_triton_overlapped_decode_and_prefill_attention_match_torch(dtype, overlap, prefill):
    """Decode attention on a second stream beside the prefill chunks' (overlap), and prefill
    chunks through torch's SDPA (prefill="sdpa"): the same output as the reference, split-KV
    decodes and chunks with cached context included, and the step's stream sees it."""
    dt = getattr(torch, dtype)
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    cases = [([1] * 3 + [300], [2047, 5, 900, 0]), ([1, 129, 1, 7], [1000, 2047, 0, 5]), ([1] * 64 + [512], [1023] * 64 + [0])]
    for i, (q_lens, ctx0) in enumerate(cases):
        err = _attention_case(32, 8, 128, q_lens, ctx0, dt, seed=i, overlap=overlap, prefill=prefill)
        assert err < tol, f"case {q_lens[:4]}... : relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_triton_ops_match_torch(dtype):
    from fairbatch.engine.ops import TorchOps
    from fairbatch.engine.triton_ops import TritonOps

    dt = getattr(torch, dtype)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    t, r = TorchOps(), TritonOps()
    torch.manual_seed(0)
    for N in (64, 3584, 4096):
        x = torch.randn(37, N, dtype=dt, device="cuda")
        res = torch.randn(37, N, dtype=dt, device="cuda")
        w = torch.randn(N, dtype=dt, device="cuda")
        assert _rel(r.rms_norm(x, w, 1e-5), t.rms_norm(x, w, 1e-5)) < tol
        a, b = t.add_rms_norm(x, res, w, 1e-6)
        c, d = r.add_rms_norm(x, res, w, 1e-6)
        assert _rel(c, a) < tol and _rel(d, b) < tol
        gu = torch.randn(37, 2 * N, dtype=dt, device="cuda")
        assert _rel(r.silu_mul(gu), t.silu_mul(gu)) < tol
    for H, KVH, D, norm in ((32, 8, 128, False), (32, 8, 128, True), (4, 2, 16, True), (28, 4, 128, False)):
        T = 53
        angles = torch.rand(8192, D // 2, device="cuda") * 6.3
        cs = torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()
        qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=dt, device="cuda")
        pos = torch.randint(0, 8192, (T,), dtype=torch.int32, device="cuda")
        slots = torch.randperm(20 * 16, device="cuda")[:T].to(torch.int32)
        qn = torch.randn(D, dtype=dt, device="cuda") if norm else None
        kn = torch.randn(D, dtype=dt, device="cuda") if norm else None
        caches = [torch.zeros(20, 16, KVH, D, dtype=dt, device="cuda") for _ in range(4)]
        q1 = t.qk_rope_cache(qkv, H, KVH, D, pos, cs, qn, kn, 1e-6, caches[0], caches[1], slots)
        q2 = r.qk_rope_cache(qkv, H, KVH, D, pos, cs, qn, kn, 1e-6, caches[2], caches[3], slots)
        assert _rel(q2, q1) < tol
        assert _rel(caches[2], caches[0]) < tol and _rel(caches[3], caches[1]) < tol


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from test_engine_support import hf_model, write_checkpoint

    path = write_checkpoint("tiny-qwen3", tmp_path_factory.mktemp("gpu-qwen3"))
    return path, hf_model(path)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_on_gpu_matches_transformers(tiny_ckpt, backend):
    from test_engine_support import hf_greedy, hf_logits

    from fairbatch.engine.llm import LLM
    from fairbatch.engine.params import SamplingParams
    from fairbatch.plan import StepPlan
    from fairbatch.request import SLO, Request

    path, hf = tiny_ckpt
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend=backend, num_kv_blocks=64,
              max_num_seqs=8)
    e = llm.engine
    ids = [random.Random(3).randrange(512) for _ in range(45)]
    req = Request("a", 0.0, 45, 4, SLO(1, 1), prompt_token_ids=ids)
    got = []
    for k in (17, 16, 12):
        e.allocator.allocate("a", req.num_computed + k)
        plan = StepPlan()
        plan.add(req, k)
        got.append(e.executor.logits_of_all_tokens(plan).cpu())
        req.num_computed += k
    e.executor.release(req)
    e.allocator.free("a")
    ref = hf_logits(hf, ids)
    assert _rel(torch.cat(got), ref) < 1e-4
    prompts = [[random.Random(n).randrange(512) for _ in range(n)] for n in (3, 20, 33, 47)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 20)
    if backend == "triton":
        assert e.executor.graphs is not None and e.executor.graphs.replays > 0
    assert e.allocator.num_free == e.allocator.num_blocks


def test_engine_with_overlap_and_sdpa_prefill_matches_transformers(tiny_ckpt):
    """Eager mixed steps with decode attention on a second stream and prefill chunks through
    SDPA generate what transformers does (the layer after attention waits for both)."""
    from test_engine_support import hf_greedy

    from fairbatch.engine.llm import LLM
    from fairbatch.engine.params import SamplingParams

    path, hf = tiny_ckpt
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", num_kv_blocks=64,
              max_num_seqs=8, cuda_graphs=False, max_num_batched_tokens=32, attention_overlap=True,
              prefill_attention="sdpa")
    prompts = [[random.Random(n).randrange(512) for _ in range(n)] for n in (3, 20, 33, 47, 60)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 12)
    assert llm.engine.backend._side is not None, "no step mixed decodes with prefill chunks"


def test_cuda_graph_decode_equals_eager(tiny_ckpt):
    """bf16: the graph replay and the eager path give the same logits on decode steps."""
    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.plan import StepPlan
    from fairbatch.request import SLO, Request

    path, _ = tiny_ckpt
    e = Engine(EngineArgs(str(path), dtype="bfloat16", device="cuda", num_kv_blocks=128, max_num_seqs=32))
    ex = e.executor
    reqs = []
    for i in range(13):
        n = 5 + 11 * i
        r = Request(f"r{i}", 0.0, n + 1, 4, SLO(1, 1), prompt_token_ids=list(range(i, i + n + 1)))
        e.allocator.allocate(r.request_id, n + 1)
        plan = StepPlan()
        plan.add(r, n)
        ex.logits_of_all_tokens(plan)
        r.num_computed = n
        reqs.append(r)
    plan = StepPlan()
    for r in reqs:
        plan.add(r, 1)
    graph_logits, sampled = ex.graphs.try_run(plan)
    eager = ex.logits_of_all_tokens(plan)
    assert len(sampled) == 13 and ex.graphs.replays == 1
    assert _rel(graph_logits, eager) < 1e-3


def test_cuda_graph_mixed_steps_equal_eager(tiny_ckpt):
    """Mixed steps (prefill chunks + decodes, ragged) replayed from token-bucket graphs,
    with their pad sequences, give the eager path's logits for every sampled row."""
    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.plan import StepPlan
    from fairbatch.request import SLO, Request

    path, _ = tiny_ckpt
    e = Engine(EngineArgs(str(path), dtype="bfloat16", device="cuda", num_kv_blocks=512, max_num_seqs=32))
    ex = e.executor
    rng = random.Random(0)
    for trial in range(12):
        chunks = []
        for i in range(rng.randint(1, 4)):       # under the 256-token mixed-graph limit
            n = rng.randint(2, 60)
            r = Request(f"t{trial}-{i}", 0.0, n, 4, SLO(1, 1), prompt_token_ids=[rng.randrange(512) for _ in range(n)])
            c = rng.randint(0, n - 1)
            if c:
                e.allocator.allocate(r.request_id, c)
                p = StepPlan()
                p.add(r, c)
                ex.logits_of_all_tokens(p)
                r.num_computed = c
            k = rng.choice([1, n - c, max(1, (n - c) // 2)])
            e.allocator.allocate(r.request_id, c + k)
            chunks.append((r, k))
        plan = StepPlan()
        for r, k in chunks:
            plan.add(r, k)
        out = ex.graphs.try_run(plan)
        assert out is not None
        got, reqs = out
        arrays, want_reqs, _, _ = ex.builder.host_arrays(plan)
        eager = ex.logits_of_all_tokens(plan)[torch.from_numpy(arrays["logits_indices"]).long().cuda()]
        assert [r.request_id for r in reqs] == [r.request_id for r in want_reqs]
        if reqs:
            assert _rel(got, eager) < 1e-3
        for r, _ in chunks:
            ex.release(r)
            e.allocator.free(r.request_id)
    assert ex.graphs.mixed_replays > 0 and e.allocator.num_free == e.allocator.num_blocks
