"""Paged KV cache tensors: per layer ``k`` and ``v`` of ``[blocks, block_size, kv_heads,
head_dim]`` (the layout vLLM's flash backends use: one token's heads are contiguous, so
writing a step's new keys is a scatter of whole rows).

Blocks ``0 .. num_blocks-1`` are exactly the ids the scheduler's ``BlockAllocator``
hands out; one extra *scratch* block at the end absorbs the writes of padding rows in
captured CUDA graphs, so padding never touches a live request's KV.
"""

from __future__ import annotations

import torch

from fairbatch.engine.config import ModelConfig


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks < 1:
            raise ValueError(f"KV cache needs at least one block, got {num_blocks}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.scratch_block = num_blocks
        # One allocation; zeroed so a bug that reads an unwritten slot shows up as a wrong
        # number, never as NaN garbage leaking through a masked-out probability.
        self.data = torch.zeros(num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=self.device)
        self.k = [self.data[i, 0] for i in range(num_layers)]
        self.v = [self.data[i, 1] for i in range(num_layers)]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        return cls(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
