"""Reference paged attention in plain PyTorch: per sequence, gather its blocks from the
cache, mask causally by absolute position, softmax in float32. Slow and obviously
right; the Triton kernels are tested against it."""

from __future__ import annotations

import numpy as np
import torch

from fairbatch.engine.attention import AttentionMetadata


class TorchAttention:
    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5

    def launch_arrays(self, q_lens: np.ndarray, seq_lens: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_block: int) -> None:
        """Nothing to compile."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_host
        B = meta.block_size
        for i in range(meta.num_seqs):
            s, e = int(qsl[i]), int(qsl[i + 1])
            ctx = int(meta.seq_lens_host[i])
            n_blk = -(-ctx // B)
            blocks = meta.block_tables[i, :n_blk].long()
            k = k_cache.index_select(0, blocks).reshape(-1, self.num_kv_heads, q.shape[-1])[:ctx]
            v = v_cache.index_select(0, blocks).reshape(-1, self.num_kv_heads, q.shape[-1])[:ctx]
            out[s:e] = self._attend(q[s:e], k, v, ctx)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int) -> torch.Tensor:
        n = q.shape[0]
        qf = q.float().transpose(0, 1)                                         # [H, n, D]
        kf = k.float().repeat_interleave(self.group, dim=1).transpose(0, 1)   # [H, ctx, D]
        vf = v.float().repeat_interleave(self.group, dim=1).transpose(0, 1)
        scores = torch.matmul(qf, kf.transpose(1, 2)) * self.scale            # [H, n, ctx]
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        return torch.matmul(p, vf).transpose(0, 1).to(q.dtype)
