"""Per-request SLO classes: parsing a class mix, and giving each request its SLO and the
priority that follows from it.

A spec such as ``"interactive:0.5:0.03:0.3,batch:5:0.15:0.7"`` lists classes as
``name:TTFT_s:TPOT_s:share``; shares are normalised when they do not sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..request import SLO
from .trace import TraceEntry


@dataclass(frozen=True)
class SLOClass:
    """A named pair of latency objectives (seconds) and its share of the requests."""

    name: str
    ttft: float
    tpot: float
    share: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or any(c in self.name for c in ",:"):
            raise ValueError(f"SLO class name must be non-empty, without ',' ':' or "
                             f"surrounding spaces, got {self.name!r}")
        for field, value in (("ttft", self.ttft), ("tpot", self.tpot), ("share", self.share)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO class {self.name!r}: {field} must be a positive number, "
                                 f"got {value}")

    def slo(self) -> SLO:
        return SLO(self.ttft, self.tpot, self.name)


def parse_slo_classes(spec: str) -> list[SLOClass]:
    """Parse ``name:TTFT_s:TPOT_s:share[,...]``; raises ValueError naming the bad part."""
    if not spec.strip():
        raise ValueError("empty SLO class spec: expected name:TTFT_s:TPOT_s:share[,...]")
    classes: list[SLOClass] = []
    for item in (item.strip() for item in spec.split(",")):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 4:
            raise ValueError(f"SLO class {item!r}: expected name:TTFT_s:TPOT_s:share "
                             f"(e.g. interactive:0.5:0.03:0.3)")
        name, *numbers = parts
        values: list[float] = []
        for field, text in zip(("TTFT", "TPOT", "share"), numbers, strict=True):
            try:
                values.append(float(text))
            except ValueError:
                raise ValueError(f"SLO class {item!r}: {field} is not a number: {text!r}") from None
        classes.append(SLOClass(name, *values))
    names = [c.name for c in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"SLO class name(s) given twice: {', '.join(duplicates)}")
    total = sum(c.share for c in classes)
    if not math.isclose(total, 1.0, rel_tol=1e-9):
        classes = [replace(c, share=c.share / total) for c in classes]
    return classes


def assign_slos(
    entries: Sequence[TraceEntry],
    *,
    default: SLO,
    classes: Sequence[SLOClass] | None = None,
    tag_map: Mapping[str, SLOClass | SLO] | None = None,
    seed: int = 0,
) -> list[SLO]:
    """One SLO per entry.

    - ``classes``: each request draws a class with probability proportional to its share
      (a seeded numpy Generator: the same seed gives the same assignment);
    - ``tag_map``: by the entry's trace tag; untagged or unmapped entries get ``default``;
    - neither: ``default`` for all. Giving both is ambiguous and an error.
    """
    if classes is not None and tag_map is not None:
        raise ValueError("give SLO classes or a tag map, not both")
    if classes is not None:
        if not classes:
            raise ValueError("classes is empty")
        shares = np.array([c.share for c in classes], dtype=float)
        picks = np.random.default_rng(seed).choice(len(classes), size=len(entries),
                                                   p=shares / shares.sum())
        slos = [c.slo() for c in classes]
        return [slos[i] for i in picks.tolist()]
    if tag_map is not None:
        by_tag = {tag: c.slo() if isinstance(c, SLOClass) else c for tag, c in tag_map.items()}
        return [by_tag.get(e.tag, default) if e.tag is not None else default for e in entries]
    return [default] * len(entries)


def slo_priorities(slos: Sequence[SLO]) -> list[int]:
    """One priority per request, vLLM's convention (lower is served first): the rank of
    its SLO's ``(ttft, tpot)`` among the distinct ones in ``slos``, tightest first, so a
    single SLO gives every request 0. Only ``vllm-priority`` reads it."""
    rank = {key: i for i, key in enumerate(sorted({(s.ttft, s.tpot) for s in slos}))}
    return [rank[(s.ttft, s.tpot)] for s in slos]
