"""FairBatching's load estimate for a router: prompt tokens an instance can still start
within a TTFT horizon.

Over a horizon of the tightest TTFT among running requests (the default SLO's when none
run), running decodes need one step per tightest pace; the fraction of time that leaves,
times the latency model's prefill rate, is the prompt work that fits; queued prompt tokens
already claim part of it. Bounded by the free KV slots, since an admitted prompt must also
fit the cache.
"""

from __future__ import annotations

from collections.abc import Iterable

from fairbatch.kv import BlockAllocator
from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepFeatures
from fairbatch.request import Request

_INF = float("inf")


def admission_budget(running: Iterable[Request], latency: LatencyModel, prefill_rate: float,
                     allocator: BlockAllocator, default_ttft: float, queued_prefill_tokens: int) -> float:
    n = ctx = 0
    min_pace = horizon = _INF
    for r in running:
        if r.slo.ttft < horizon:
            horizon = r.slo.ttft
        if r.generated > 0 and r.num_computed >= r.prompt_len:
            n += 1
            ctx += r.num_computed
            if r.pace < min_pace:
                min_pace = r.pace
    if horizon == _INF:
        horizon = default_ttft   # idle: the default class's TTFT
    # the step of every decode, summed at once: a decode with c cached tokens adds one
    # sequence, one token, c + 1 context tokens and c + 1 attention pairs (StepFeatures.add)
    busy = latency.predict(StepFeatures(n, n, ctx + n, float(ctx + n))) / min_pace if n else 0.0
    compute_tokens = max(0.0, 1.0 - busy) * horizon * prefill_rate
    kv_tokens = allocator.num_free * allocator.block_size
    return min(compute_tokens, kv_tokens) - queued_prefill_tokens
