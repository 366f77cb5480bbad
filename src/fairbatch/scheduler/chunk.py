"""How large a prefill chunk the deadline-driven policies give a request: the largest whose
step, priced by the latency model with everything already in it, stays within the step's
time budget ``T``. Where the model cut the chunk it is rounded down to ``chunk_align``
(regular chunk shapes) and dropped below ``min_chunk`` unless it ends the prompt. A step
with nothing else in it always gets a ``min_chunk`` chunk, so the instance progresses.
"""

from __future__ import annotations

from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepPlan
from fairbatch.request import Request

_INF = float("inf")


def _progress_floor(cfg, pending: int) -> int:
    return min(pending, max(cfg.min_chunk, 1), cfg.max_num_batched_tokens)


def fairbatching_chunk(latency: LatencyModel, cfg, req: Request, plan: StepPlan, T: float,
                       token_cap: int) -> int:
    """Largest chunk of ``req``'s pending tokens that keeps the step within ``T``."""
    feats = plan.features
    pending = req.prompt_len + req.generated - req.num_computed
    limit = min(pending, token_cap - feats.new_tokens)
    if limit <= 0:
        return 0
    k = latency.max_chunk(feats, req.num_computed, limit, T)
    if k < pending:
        k -= k % cfg.chunk_align
        if k < cfg.min_chunk:
            k = 0
    if k == 0 and plan.is_empty:
        k = _progress_floor(cfg, pending)
    return k


def qoserve_chunk(latency: LatencyModel, cfg, req: Request, plan: StepPlan, T: float,
                  step_cap: int) -> int:
    """Largest chunk of ``req``'s pending tokens whose step fits ``T`` (``inf``: no decodes
    running) and ``step_cap``, or what the step-size floor ``qoserve_min_step_tokens``
    allows."""
    feats = plan.features
    pending = req.prompt_len + req.generated - req.num_computed
    room = step_cap - feats.new_tokens
    limit = pending if pending < room else room
    if limit > 0:
        if T == _INF:
            k = limit
        else:
            k = latency.max_chunk(feats, req.num_computed, limit, T)
            if k < limit:
                k -= k % cfg.chunk_align    # cut by the model: keep chunk shapes regular
        floor = cfg.qoserve_min_step_tokens - feats.new_tokens
        if k < floor:
            k = floor if floor < limit else limit
        if k < pending and k < cfg.min_chunk:
            k = 0
    else:
        k = 0
    if k == 0 and plan.is_empty:
        k = _progress_floor(cfg, pending)   # always progress
    return k
