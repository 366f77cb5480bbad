"""Prompts that carry a trace's shared prefixes, and how much of a workload is shared.

A Mooncake trace names each prompt's 512-token blocks (``TraceEntry.hash_ids``; an id
names its block's whole prefix). ``trace_prompt`` turns those names into token ids so
that the same id always gives the same 512 tokens: token ``p`` of block ``h`` is a
counter-based hash (SplitMix64) of ``(h, p)`` and the run's key, mapped into
``[TOKEN_LOW, TOKEN_HIGH]``; the last block is cut to the prompt's length. Any server
that caches prefixes (ours, vLLM, SGLang) then sees exactly the trace's reuse.

``TOKEN_LOW`` skips ids 0-2 (``<unk>``, ``<s>``, ``</s>`` of Llama-2 and Mistral
vocabularies); ids up to 100 are ordinary tokens of every vocabulary the presets use
(the smallest, ``tiny-llama``, has 512). Within one 512-token block of 98 symbols, two
different ids give equal 16-token blocks with probability ~98**-16: never.

``key`` mixes the bench's ``--seed`` and a *salt*: a capacity search replays the same
trace several times, and a server would find each replay's prompts in its cache from the
previous one; each replay after the first gets its own salt, so the trace's sharing is
kept within a replay and nothing is shared across replays.

``shared_prompt_tokens`` counts, for a list of prompts in arrival order, the prompt
tokens an unbounded cache of ``block_size``-token blocks would reuse (every full block
whose prefix an earlier prompt sent, less the block of the last prompt token, which is
always computed, as in vLLM and fairbatch's engine): the hit rate the workload allows,
against which a server's measured one is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fairbatch.block_hash import MOONCAKE_BLOCK as TRACE_BLOCK   # tokens per hash id
from fairbatch.kv import prompt_block_hashes, trace_block_hashes

TOKEN_LOW, TOKEN_HIGH = 3, 100     # token ids of generated prompts, inclusive
_M = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def prompt_key(seed: int, salt: int = 0) -> int:
    """The key of a replay: distinct (seed, salt) give unrelated prompts."""
    z = _mix(np.array([(seed * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03 + 1) & _M], dtype=np.uint64))
    return int(z[0])


def trace_prompt(hash_ids: Sequence[int], prompt_len: int, key: int = 0) -> list[int]:
    """``prompt_len`` token ids whose 512-token block ``j`` depends only on
    ``hash_ids[j]`` and ``key``. A prompt longer than its hash ids cover (a trace that
    names fewer blocks) gets its remaining blocks named by its own last id and position."""
    n_blocks = -(-prompt_len // TRACE_BLOCK)
    ids = np.asarray([h & _M for h in hash_ids[:n_blocks]], dtype=np.uint64)
    if len(ids) < n_blocks:        # blocks the trace does not name: private to this prompt
        last = int(ids[-1]) if len(ids) else 0
        extra = _mix(np.arange(1, n_blocks - len(ids) + 1, dtype=np.uint64) + np.uint64(last))
        ids = np.concatenate([ids, extra ^ np.uint64(0x5851F42D4C957F2D)])
    with np.errstate(over="ignore"):
        block_key = _mix(ids * _GOLDEN ^ np.uint64(key))
        pos = np.arange(1, TRACE_BLOCK + 1, dtype=np.uint64) * _GOLDEN
        z = _mix(block_key[:, None] + pos[None, :]).reshape(-1)[:prompt_len]
    return (z % np.uint64(TOKEN_HIGH - TOKEN_LOW + 1) + np.uint64(TOKEN_LOW)).astype(np.int64).tolist()


def shared_prompt_tokens(prompts: Sequence[tuple[Sequence[int] | None, Sequence[int], int]],
                         block_size: int = 16) -> int:
    """Prompt tokens an unbounded ``block_size`` cache reuses over ``prompts``, each
    ``(hash_ids or None, token ids, prompt_len)`` in arrival order: a traced prompt is
    named from its hash ids (cheap), any other from its tokens."""
    seen: set[int] = set()
    shared = 0
    for hash_ids, token_ids, prompt_len in prompts:
        if hash_ids is not None:
            names = trace_block_hashes(hash_ids, prompt_len, block_size, TRACE_BLOCK)
        else:
            names = prompt_block_hashes(token_ids, block_size)
        held = 0
        for h in names:
            if h not in seen:
                break
            held += 1
        shared += min(held, max(0, prompt_len - 1) // block_size) * block_size
        seen.update(names)
    return shared
