"""Names of full KV blocks for prefix caching: equal names mean equal KV.

A block's name covers every token before it (hash-chained), because a block's KV depends
on its whole prefix, not only on its own tokens. Names are deterministic across
processes and machines (no salted ``hash()`` of str or bytes), so a router can compare
the names it computed with an instance's.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

MOONCAKE_BLOCK = 512    # tokens per hash id in Mooncake's traces


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """One name per full ``block_size``-token block of the prompt ``token_ids``, each a
    128-bit blake2b digest of its parent's digest and its own tokens. A cryptographic
    hash: a client cannot forge a prompt whose block collides with another user's (it
    would read their KV), which a 64-bit mixing hash would not rule out."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tokens = array("q", token_ids)
    out: list[int] = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = blake2b(parent + tokens[start:start + block_size].tobytes(), digest_size=16).digest()
        out.append(int.from_bytes(parent, "little"))
    return out


def trace_block_hashes(hash_ids: Sequence[int], prompt_len: int, block_size: int,
                       trace_block: int = MOONCAKE_BLOCK) -> list[int]:
    """Names of the full ``block_size`` blocks of a traced prompt of ``prompt_len`` tokens
    whose ``trace_block``-token blocks carry ``hash_ids`` (Mooncake's: a hash id names
    its block's whole prefix). Sub-block ``j`` of trace block ``h`` is named
    ``h * (trace_block // block_size) + j``: distinct for distinct (prefix, position),
    and far cheaper than hashing (a 15k-token prompt has ~1,000 blocks of 16)."""
    if block_size < 1 or trace_block % block_size:
        raise ValueError(f"block_size {block_size} must divide the trace's block of {trace_block} tokens")
    per = trace_block // block_size
    full = min(prompt_len // block_size, len(hash_ids) * per)
    out = [h * per + j for h in hash_ids[:-(-full // per)] for j in range(per)]
    del out[full:]
    return out
