"""Prefill chunks' attention through torch's scaled-dot-product attention (FlashAttention
on CUDA where it applies), for eager steps.

Each chunk's context (its cached tokens and its own, whose K/V the step already wrote to
the cache) is gathered from the paged cache into contiguous tensors, a few microseconds of
copying per layer against the chunk's attention math, and attended with a lower-right
causal mask (a chunk's first query sees the whole cached context). One call per chunk
from host-side lengths, so no device sync; CUDA graphs keep the Triton kernel (shapes
here vary step to step). The gathered copy is transient memory the KV sizing does not
reserve: context x kv_heads x head_dim x 4 bytes per chunk (Llama-3-8B: 32 MiB at 8k
tokens). Whether it beats the Triton kernel is for the GPU to say
(``benchmarks/micro/prefill_attention.py``); ``--prefill-attention`` chooses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from fairbatch.engine.attention import AttentionMetadata


def gather_context(cache: torch.Tensor, block_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` positions of one sequence from a paged cache ``[blocks, B, KVH, D]``,
    contiguous ``[n, KVH, D]``."""
    b = cache.shape[1]
    return cache.index_select(0, block_row[:-(-n // b)]).flatten(0, 1)[:n]


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> None:
    """Write into ``out`` the attention of every sequence of the step with more than one
    new token (decodes are left to the caller)."""
    qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
    for s in range(meta.num_seqs):
        start, q_len, ctx = int(qsl[s]), int(qsl[s + 1] - qsl[s]), int(lens[s])
        if q_len <= 1:
            continue
        k = gather_context(k_cache, meta.block_tables[s], ctx).transpose(0, 1).unsqueeze(0)
        v = gather_context(v_cache, meta.block_tables[s], ctx).transpose(0, 1).unsqueeze(0)
        qs = q[start:start + q_len].transpose(0, 1).unsqueeze(0)          # [1, H, q_len, D]
        if q_len == ctx:     # no cached context: plain causal
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=causal_lower_right(q_len, ctx), scale=scale,
                                               enable_gqa=True)
        out[start:start + q_len] = o[0].transpose(0, 1)
