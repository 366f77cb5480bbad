"""The Triton kernels on a CPU, in Triton's interpreter (``TRITON_INTERPRET=1``), against the
torch reference: split-KV decode attention merged across splits (empty splits included),
prefill chunks beside decodes (the Triton kernel's and the SDPA path's), the start-up compile of every split variant, and the fused
q/k norm + rotary + KV-write kernel. For kernel work between GPU sessions; skipped where
Triton is not installed (CI: the CPU torch wheel does not bring it) and for Triton older
than 3.9, whose interpreter cannot run the attention kernel's data-dependent loop bounds.
The same kernels are tested compiled in tests/test_engine_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels (3.9+)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: triton.jit reads TRITON_INTERPRET when the kernels are defined.
CHECK = r'''
import torch
from engine_roofline import paged_inputs, paged_meta
from fairbatch.engine.attention.torch_ref import TorchAttention
from fairbatch.engine.attention import triton_paged as tp
from fairbatch.engine.kv_cache import KVCache
from fairbatch.engine.ops import TorchOps
from fairbatch.engine.triton_ops import TritonOps

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

def attention(H, KVH, D, q_lens, ctx0, seed, prefill="triton"):
    tri = tp.TritonPagedAttention(H, KVH, D, prefill=prefill)
    g = torch.Generator().manual_seed(seed)
    q, kc, vc, seq_lens = paged_inputs(q_lens, ctx0, H, KVH, D, 16, torch.float32, spare_blocks=3, generator=g,
                                       device="cpu")
    meta = paged_meta(tri, q_lens, seq_lens, 16, num_blocks=kc.shape[0], extra_width=2, seed=seed, device="cpu")
    return rel(tri.forward(q, kc, vc, meta), TorchAttention(H, KVH, D).forward(q, kc, vc, meta))

cases = [([1], [700]), ([1] * 3, [15, 200, 33]), ([16, 1, 33], [0, 130, 16]), ([1, 40, 1], [1000, 5, 77])]
for programs_per_sm, max_splits in ((0, 16), (1000, 2), (1000, 16)):
    tp.SPLIT_KV.update(programs_per_sm=programs_per_sm, max_splits=max_splits)
    for H, KVH, D in ((8, 4, 32), (6, 2, 16)):
        for i, (q_lens, ctx0) in enumerate(cases):
            err = attention(H, KVH, D, q_lens, ctx0, i)
            assert err < 1e-5, (programs_per_sm, max_splits, H, KVH, D, q_lens, ctx0, err)
for i, (q_lens, ctx0) in enumerate(cases):     # prefill chunks through torch's SDPA, decodes split
    err = attention(8, 2, 32, q_lens, ctx0, i, prefill="sdpa")
    assert err < 1e-5, ("sdpa prefill", q_lens, ctx0, err)
tp.SPLIT_KV.update(programs_per_sm=2, max_splits=16)
att = tp.TritonPagedAttention(8, 2, 32)
assert {att.decode_splits(n) for n in range(1, 100)} == {1, 2, 4, 8}, "8 SMs: powers of two up to 8"
kv = KVCache(2, 4, 16, 2, 32, torch.float32, "cpu")
att.warm_up(kv.k[0], kv.v[0], kv.scratch_block)
assert not kv.data.any(), "warm-up reads the scratch block, writes nothing"

torch.manual_seed(0)
for H, KVH, D, norm in ((32, 8, 128, False), (32, 8, 128, True), (4, 2, 16, True), (6, 1, 64, True)):
    T = 9
    angles = torch.rand(4096, D // 2) * 6.3
    cs = torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()
    qkv = torch.randn(T, (H + 2 * KVH) * D)
    pos = torch.randint(0, 4096, (T,), dtype=torch.int32)
    slots = torch.randperm(20 * 16)[:T].to(torch.int32)
    qn = torch.randn(D) if norm else None
    kn = torch.randn(D) if norm else None
    caches = [torch.zeros(20, 16, KVH, D) for _ in range(4)]
    q1 = TorchOps().qk_rope_cache(qkv, H, KVH, D, pos, cs, qn, kn, 1e-6, caches[0], caches[1], slots)
    q2 = TritonOps().qk_rope_cache(qkv, H, KVH, D, pos, cs, qn, kn, 1e-6, caches[2], caches[3], slots)
    assert rel(q2, q1) < 1e-6 and rel(caches[2], caches[0]) < 1e-6 and torch.equal(caches[3], caches[1]), (H, KVH, D)
print("ok")
'''


def test_kernels_match_torch_in_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks" / "micro")]))
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
