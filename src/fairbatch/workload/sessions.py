"""A synthetic multi-turn chat workload whose requests share prefixes, for traces that say
nothing of sharing (bundled name ``multi-turn``).

A session's token stream only grows: each turn's prompt is the previous turn's prompt, its
answer and a new user message, after a system prompt every session shares. Prompts are
named as Mooncake names them (``TraceEntry.hash_ids``, one id per 512-token block), so the
prefix cache, the bench's prompts and the prefix router treat both alike. Because the
stream is append-only, a block's id is fixed by (session, block index); blocks wholly
inside the system prompt carry ids shared by every session.
"""

from __future__ import annotations

import numpy as np

from .trace import TraceEntry

BLOCK = 512                 # tokens per hash id, as in Mooncake's traces
_SESSION_IDS = 1 << 20      # hash ids per session (prompts up to 512M tokens)


def multi_turn_trace(num_sessions: int = 1000, *, session_rate: float = 0.5, turns: tuple[int, int] = (2, 8),
                     system_prompt: int = 1024, user_tokens: float = 200.0, output_tokens: float = 250.0,
                     think_time: float = 20.0, max_prompt: int = 7168, seed: int = 0) -> list[TraceEntry]:
    """Sessions starting as a Poisson process of ``session_rate`` per second, each of a
    uniform number of turns in ``turns``; a turn's new user message and its answer are
    exponential with means ``user_tokens`` and ``output_tokens`` (at least one token), and
    the next turn comes an exponential ``think_time`` seconds later (answer time included).
    A session ends early once its prompt would exceed ``max_prompt``. Sorted by arrival,
    the first at 0."""
    if num_sessions < 1 or not session_rate > 0 or not 1 <= turns[0] <= turns[1] or system_prompt < 0:
        raise ValueError("need num_sessions >= 1, session_rate > 0, 1 <= turns[0] <= turns[1], system_prompt >= 0")
    rng = np.random.default_rng(seed)
    starts = np.concatenate(([0.0], np.cumsum(rng.exponential(1.0 / session_rate, num_sessions - 1))))
    shared = system_prompt // BLOCK           # blocks every session's stream starts with
    entries: list[TraceEntry] = []
    for s, t in enumerate(starts.tolist()):
        history = system_prompt
        for _ in range(int(rng.integers(turns[0], turns[1] + 1))):
            prompt = history + 1 + int(rng.exponential(user_tokens))
            if prompt > max_prompt:
                break
            output = 1 + int(rng.exponential(output_tokens))
            ids = tuple(j if j < shared else (s + 1) * _SESSION_IDS + j for j in range(-(-prompt // BLOCK)))
            entries.append(TraceEntry(t, prompt, output, None, ids))
            history = prompt + output
            t += float(rng.exponential(think_time))
    entries.sort(key=lambda e: e.arrival)
    return entries
