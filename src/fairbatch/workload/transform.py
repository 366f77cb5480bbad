"""Pure transformations of a trace (lists of TraceEntry); inputs are never modified."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .trace import TraceEntry


def scale_rate(entries: Sequence[TraceEntry], rate_scale: float) -> list[TraceEntry]:
    """Compress time by ``rate_scale``: 2.0 replays the trace at twice its request rate.

    Dividing arrival times keeps the trace's burst structure (its inter-arrival CV),
    which is how capacity search sweeps the load.
    """
    if not (rate_scale > 0 and math.isfinite(rate_scale)):
        raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale}")
    return [TraceEntry(e.arrival / rate_scale, e.prompt_len, e.output_len, e.tag, e.hash_ids)
            for e in entries]


def truncate_to_context(entries: Sequence[TraceEntry], max_model_len: int
                        ) -> tuple[list[TraceEntry], int]:
    """Make every request fit ``prompt_len + output_len <= max_model_len``.

    The output is clipped first (down to 1 token), then the prompt: this is what a real
    server does with an over-long generation (it stops at the context limit) and it keeps
    the prompt, i.e. the prefill load that batch formation is about. Only a prompt that
    alone does not fit is shortened (to ``max_model_len - 1``) instead of dropped, so the
    arrival pattern stays intact. Returns the new entries and how many were changed.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), "
                         f"got {max_model_len}")
    out: list[TraceEntry] = []
    changed = 0
    for e in entries:
        if e.prompt_len + e.output_len <= max_model_len:
            out.append(e)
            continue
        output = max(1, max_model_len - e.prompt_len)
        prompt = min(e.prompt_len, max_model_len - output)
        out.append(TraceEntry(e.arrival, prompt, output, e.tag, e.hash_ids))
        changed += 1
    return out, changed


def take(entries: Sequence[TraceEntry], n: int) -> list[TraceEntry]:
    """The first ``n`` requests; asking for more than the trace holds is an error."""
    if n < 0:
        raise ValueError(f"cannot take a negative number of requests ({n})")
    if n > len(entries):
        raise ValueError(f"asked for {n} requests but the trace has only {len(entries)}")
    return list(entries[:n])


def mean_rate(entries: Sequence[TraceEntry]) -> float:
    """Requests per second: (n - 1) gaps over the span from first to last arrival.

    Counting gaps rather than requests makes this an unbiased estimate of a renewal
    process's rate (with the first arrival at 0, n requests span n - 1 gaps).
    """
    if len(entries) < 2:
        raise ValueError("a mean rate needs at least two requests")
    span = max(e.arrival for e in entries) - min(e.arrival for e in entries)
    return math.inf if span <= 0 else (len(entries) - 1) / span
