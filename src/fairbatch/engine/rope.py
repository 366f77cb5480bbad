"""Rotary position embedding tables by absolute position (default, linear, llama3).

The table is built once per model: row ``p`` holds ``cos(p * inv_freq)`` then
``sin(p * inv_freq)`` in float32 (``[max_pos, head_dim]``), and every step gathers the
rows of its tokens' positions, so chunked prefill, decodes and recompute all rotate
by absolute position. Frequencies are computed in float32 exactly as transformers does,
so our rotations match its reference bit for bit before the dtype cast.
"""

from __future__ import annotations

import math

import torch

from fairbatch.engine.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    kind = cfg.rope_type
    sc = cfg.rope_scaling or {}
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        inv = _llama3(inv, float(sc["factor"]), float(sc["low_freq_factor"]),
                      float(sc["high_freq_factor"]), float(sc["original_max_position_embeddings"]))
    return inv


def _llama3(inv: torch.Tensor, factor: float, low: float, high: float, old_ctx: float) -> torch.Tensor:
    # Llama 3.1: long wavelengths (beyond old_ctx/low) are slowed by `factor`, short ones
    # (below old_ctx/high) kept, and the band between interpolated smoothly.
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


def cos_sin_table(cfg: ModelConfig, max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    inv = inv_frequencies(cfg)
    pos = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
    freqs = pos[:, None] * inv[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous().to(device)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ([T, heads, D]) by the gathered table rows ``cos_sin`` ([T, D]),
    rotate-half (GPT-NeoX) layout as in HF Llama checkpoints. Computes in float32."""
    half = x.shape[-1] // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
