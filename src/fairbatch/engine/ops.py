"""The model's non-matmul operations, as an object the model calls through.

``TorchOps`` is the reference (any device, any dtype); ``TritonOps``
(``fairbatch.engine.triton_ops``) fuses the same functions into single kernels on the
GPU. Semantics follow transformers' Llama/Qwen3 code: RMSNorm in float32 then cast back
before the weight multiply; residual sums in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fairbatch.engine.rope import apply_rope


class TorchOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(rms_norm(x + residual), x + residual)``."""
        s = x + residual
        return self.rms_norm(s, weight, eps), s

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        d = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :d]) * gate_up[..., d:]

    def qk_rope_cache(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                      positions: torch.Tensor, cos_sin: torch.Tensor, q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Split the fused q/k/v projection, apply the per-head q/k norm (Qwen3) and RoPE,
        write k and v into their cache slots, and return q as ``[T, num_heads, head_dim]``."""
        T = qkv.shape[0]
        qs, ks = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :qs].reshape(T, num_heads, head_dim)
        k = qkv[:, qs:qs + ks].reshape(T, num_kv_heads, head_dim)
        v = qkv[:, qs + ks:].reshape(T, num_kv_heads, head_dim)
        if q_norm is not None:
            q = self.rms_norm(q, q_norm, eps)
            k = self.rms_norm(k, k_norm, eps)
        cs = cos_sin.index_select(0, positions)
        q = apply_rope(q, cs)
        k = apply_rope(k, cs)
        slots = slot_mapping.long()
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
        return q.contiguous()


def make_ops(device: torch.device, kind: str | None = None) -> TorchOps:
    """``kind``: ``"torch"`` or ``"triton"``; None picks Triton on CUDA when importable."""
    if kind is None:
        kind = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if kind == "torch":
        return TorchOps()
    if kind == "triton":
        from fairbatch.engine.triton_ops import TritonOps

        return TritonOps()
    raise ValueError(f"unknown ops kind {kind!r}; choose torch or triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
