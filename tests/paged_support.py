"""A random step over a paged KV cache for the attention tests on the CPU: sequences with
``q_lens`` new tokens after ``ctx0`` cached ones, their blocks scattered over the cache,
block tables wider than needed, and the backend's launch arrays when one is given."""

from __future__ import annotations

import numpy as np
import torch

from fairbatch.engine.attention import AttentionMetadata

B = 16


def random_paged_step(q_lens, ctx0, H, KVH, D, seed, backend=None, dtype=torch.float32):
    """-> (q, k_cache, v_cache, meta), all on the CPU."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = np.array([c + k for c, k in zip(ctx0, q_lens)], np.int32)
    nblocks = sum(-(-int(s) // B) for s in seq_lens) + 3
    kc = torch.randn(nblocks, B, KVH, D, generator=g).to(dtype)
    vc = torch.randn(nblocks, B, KVH, D, generator=g).to(dtype)
    perm = np.random.default_rng(seed).permutation(nblocks)
    bt = np.zeros((len(q_lens), max(-(-int(s) // B) for s in seq_lens) + 2), np.int32)
    o = 0
    for i, s in enumerate(seq_lens):
        n = -(-int(s) // B)
        bt[i, :n] = perm[o:o + n]
        o += n
    qsl = np.zeros(len(q_lens) + 1, np.int32)
    qsl[1:] = np.cumsum(q_lens)
    q = torch.randn(int(qsl[-1]), H, D, generator=g).to(dtype)
    extra = backend.launch_arrays(np.array(q_lens), seq_lens) if backend is not None else {}
    t = torch.from_numpy
    meta = AttentionMetadata(torch.zeros(len(q), dtype=torch.int32), t(qsl), t(seq_lens), t(bt), len(q), len(q_lens),
                             max(q_lens), int(seq_lens.max()), qsl, seq_lens, B, {k: t(v) for k, v in extra.items()},
                             {k: int(v.size) for k, v in extra.items()})
    return q, kc, vc, meta
