"""How many programs split one decode's keys (split-KV, as flash-decoding does).

With few sequences decoding, one program per sequence x KV head leaves most of the GPU idle
(8 programs for one Llama-3-8B sequence); splitting each sequence's keys over several
programs, whose partial results are merged by their log-sum-exp, fills it. The split count
is a compile-time constant of the attention kernel, so it must come from a small fixed set
that start-up can compile in full (``split_variants``): a Triton compile mid-serving stalls
every request for about a second. It depends on the decode count alone, so a CUDA graph
captured for a batch size replays with the same grid. No torch or Triton here: CI checks it.
"""

from __future__ import annotations

# about this many programs per SM in all; 2 measured best on an H100 (benchmarks/micro/split_kv.py)
PROGRAMS_PER_SM = 2
MAX_SPLITS = 16          # a power of two


def _next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def decode_splits(n_dec: int, num_kv_heads: int, num_sms: int, programs_per_sm: int = PROGRAMS_PER_SM,
                  max_splits: int = MAX_SPLITS) -> int:
    """Splits per decode for a step with ``n_dec`` decodes: a power of two up to
    ``max_splits``, 1 once the decodes alone fill the GPU (``programs_per_sm`` 0: off)."""
    want = -(-programs_per_sm * num_sms // max(1, n_dec * num_kv_heads))
    return 1 if want <= 1 else min(max_splits, _next_pow2(want))


def split_variants(max_splits: int = MAX_SPLITS) -> list[int]:
    """Every split count above 1 that ``decode_splits`` can return: what start-up compiles."""
    return [1 << i for i in range(1, max_splits.bit_length()) if 1 << i <= max_splits]
