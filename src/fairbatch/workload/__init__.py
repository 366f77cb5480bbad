"""Workloads: trace readers, arrival processes, SLO classes, and Requests built from them.

Typical use::

    entries = load_trace("azure-conv")                       # or a path to any trace file
    slos = assign_slos(entries, default=SLO(1.0, 0.05),
                       classes=parse_slo_classes("interactive:0.5:0.03:0.3,batch:5:0.15:0.7"))
    requests = make_requests(scale_rate(entries, 2.0), slos)
"""

from __future__ import annotations

from collections.abc import Sequence

from ..request import SLO, DeadlineRule, Request
from .arrivals import ArrivalProcess, GammaArrivals, PoissonArrivals, retime
from .load import bundled_traces, load_trace
from .readers import FORMATS, TraceFile, detect_format, read_trace
from .sessions import multi_turn_trace
from .slo_classes import SLOClass, assign_slos, parse_slo_classes, slo_priorities
from .trace import TraceEntry, TraceError
from .transform import mean_rate, scale_rate, take, truncate_to_context

__all__ = [
    "FORMATS", "ArrivalProcess", "GammaArrivals", "PoissonArrivals", "SLOClass", "TraceEntry",
    "TraceError", "TraceFile", "assign_slos", "bundled_traces", "detect_format", "load_trace",
    "make_requests", "mean_rate", "multi_turn_trace", "parse_slo_classes", "read_trace", "retime", "scale_rate",
    "slo_priorities", "take", "truncate_to_context",
]


def make_requests(
    entries: Sequence[TraceEntry],
    slos: Sequence[SLO] | SLO,
    *,
    deadline_rule: DeadlineRule = DeadlineRule.TPOT_SAFE,
    id_prefix: str = "req",
    priorities: Sequence[int] | None = None,
) -> list[Request]:
    """Requests ``{id_prefix}-{i}`` with ``max_new_tokens = output_len``.

    ``slos`` is one SLO per entry (see ``assign_slos``) or a single SLO for all.
    ``priorities`` (lower first, as vLLM's) defaults to the rank of each request's SLO
    class, tightest first (``slo_priorities``).
    """
    if isinstance(slos, SLO):
        slos = [slos] * len(entries)
    if len(slos) != len(entries):
        raise ValueError(f"{len(slos)} SLOs for {len(entries)} trace entries")
    if priorities is None:
        priorities = slo_priorities(slos)
    elif len(priorities) != len(entries):
        raise ValueError(f"{len(priorities)} priorities for {len(entries)} trace entries")
    return [
        Request(f"{id_prefix}-{i}", e.arrival, e.prompt_len, e.output_len, slo,
                deadline_rule=deadline_rule, priority=prio)
        for i, (e, slo, prio) in enumerate(zip(entries, slos, priorities, strict=True))
    ]
