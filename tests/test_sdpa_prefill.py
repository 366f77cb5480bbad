"""The prefill path through torch's scaled-dot-product attention (engine/attention/
sdpa_prefill.py) against the reference paged attention, on the CPU: chunks with and
without cached context, blocks scattered over the cache, GQA, decodes left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro"))
from engine_roofline import paged_inputs, paged_meta  # noqa: E402

from fairbatch.engine.attention.sdpa_prefill import gather_context, prefill_attention  # noqa: E402
from fairbatch.engine.attention.torch_ref import TorchAttention  # noqa: E402

B = 16


def _step(q_lens, ctx0, H, KVH, D, seed):
    """A random step on the CPU, blocks scattered, tables wider than needed."""
    g = torch.Generator().manual_seed(seed)
    q, kc, vc, seq_lens = paged_inputs(q_lens, ctx0, H, KVH, D, B, torch.float32, spare_blocks=3, generator=g,
                                       device="cpu")
    meta = paged_meta(None, q_lens, seq_lens, B, num_blocks=kc.shape[0], extra_width=2, seed=seed, device="cpu")
    return q, kc, vc, meta


def test_gather_context_reads_a_sequence_in_position_order() -> None:
    cache = torch.arange(5 * B, dtype=torch.float32).view(5, B, 1, 1)
    row = torch.tensor([3, 0, 4], dtype=torch.int32)
    got = gather_context(cache, row, 2 * B + 5).flatten()
    want = torch.cat([torch.arange(3 * B, 4 * B), torch.arange(0, B), torch.arange(4 * B, 4 * B + 5)]).float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("H,KVH,D", [(8, 2, 32), (4, 4, 16), (6, 1, 64)])
def test_prefill_chunks_match_the_reference(H, KVH, D) -> None:
    cases = [([40], [0]), ([1, 33, 1, 16], [70, 0, 5, 100]), ([17, 64], [31, 200]), ([2, 1], [0, 3])]
    for i, (q_lens, ctx0) in enumerate(cases):
        q, kc, vc, meta = _step(q_lens, ctx0, H, KVH, D, i)
        want = TorchAttention(H, KVH, D).forward(q, kc, vc, meta)
        out = torch.full_like(q, float("nan"))
        prefill_attention(q, kc, vc, out, meta, D ** -0.5)
        rows = np.repeat(np.array(q_lens) > 1, q_lens)
        assert torch.allclose(out[rows], want[rows], atol=1e-5, rtol=1e-4), (q_lens, ctx0)
        assert torch.isnan(out[~rows]).all(), "decode rows are the caller's"
