"""Attention over the paged KV cache for a flattened mixed batch.

A step's tokens are grouped by sequence (``query_start_loc``); sequence ``i`` has
``seq_lens[i]`` tokens of context *including* its new ones, whose K/V were written to
the cache before attention runs, so a new token at absolute position ``p`` attends
cached positions ``0..p`` (causal over cached context plus the chunk). Backends:

- ``torch``: plain reference (CPU and GPU): gathers each sequence's blocks.
- ``triton``: paged kernels for the GPU; prefill chunks and decodes in one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

BACKENDS = ("torch", "triton")
PREFILL_KERNELS = ("triton", "sdpa")      # the triton backend's prefill paths (--prefill-attention)


@dataclass
class AttentionMetadata:
    """Device tensors (int32) plus the host copies the torch backend loops over."""

    slot_mapping: torch.Tensor        # [T] cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor     # [S+1]
    seq_lens: torch.Tensor            # [S] context after this step (cached + new)
    block_tables: torch.Tensor        # [S, W] physical block ids, padded
    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc_host: np.ndarray
    seq_lens_host: np.ndarray
    block_size: int
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # backend launch maps
    extra_host: dict[str, int] = field(default_factory=dict)


class AttentionBackend(Protocol):
    name: str

    def launch_arrays(self, q_lens: np.ndarray, seq_lens: np.ndarray) -> dict[str, np.ndarray]:
        """Extra int32 index arrays the backend needs on the device (built on the host
        with the rest of the batch, so one transfer carries everything)."""
        ...

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """``q``: [T, H, D] (rotated). Returns [T, H, D]."""
        ...

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_block: int) -> None:
        """Compile, before serving, the kernel variants that steps pick by their shape
        (reading only ``scratch_block`` of the cache)."""
        ...


def default_backend_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            return "triton"
        except ImportError:
            return "torch"
    return "torch"


def make_backend(name: str | None, device: torch.device, num_heads: int, num_kv_heads: int,
                 head_dim: int, *, overlap: bool = False, prefill: str = "triton") -> AttentionBackend:
    """``overlap`` and ``prefill``: the triton backend's options (``TritonPagedAttention``)."""
    name = name or default_backend_name(device)
    if prefill not in PREFILL_KERNELS:
        raise ValueError(f"unknown prefill attention {prefill!r}; choose from {', '.join(PREFILL_KERNELS)}")
    if name == "torch":
        if overlap or prefill != "triton":
            raise ValueError("--attention-overlap and --prefill-attention need the triton backend")
        from fairbatch.engine.attention.torch_ref import TorchAttention

        return TorchAttention(num_heads, num_kv_heads, head_dim)
    if name == "triton":
        if device.type != "cuda" and not _interpreting():
            raise ValueError("the triton attention backend needs a CUDA device; use --attention-backend torch")
        from fairbatch.engine.attention.triton_paged import TritonPagedAttention

        return TritonPagedAttention(num_heads, num_kv_heads, head_dim, overlap=overlap, prefill=prefill)
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
