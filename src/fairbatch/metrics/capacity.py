"""Capacity search: the highest arrival-rate scale at which an SLO metric meets a target.

``run(rate_scale)`` replays the workload with its arrivals compressed in time by
``rate_scale`` (2.0 = twice the request rate) and returns a :func:`summarize` dict.
Attainment is assumed roughly monotone decreasing in rate; bisection keeps a bracket
``good < bad`` (``good`` passes, ``bad`` fails), so with noise it still returns a scale
that was actually measured to pass, next to one measured to fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Summary = dict[str, Any]
Point = tuple[float, float, Summary]        # (rate_scale, request_rate, summary)


def request_rate_of(summary: Summary) -> float:
    """The run's request rate: the caller's ``request_rate`` (vLLM metadata key) when it
    is a finite number, else the measured ``request_throughput``."""
    r = summary.get("request_rate")
    if isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r):
        return float(r)
    return float(summary.get("request_throughput", 0.0))


@dataclass(slots=True)
class CapacityResult:
    rate_scale: float          # 0.0 when even the smallest scale tried failed
    request_rate: float
    points: list[Point] = field(default_factory=list)   # every evaluation, by rate_scale
    target: float = 0.9
    key: str = "slo_attainment"
    # "ok": bracketed to rel_tol (or max_iter); "above_range": passed at the largest scale
    # tried (capacity is at least this); "below_range": failed at the smallest tried.
    status: str = "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate_scale": self.rate_scale,
            "request_rate": self.request_rate,
            "target": self.target,
            "key": self.key,
            "status": self.status,
            "points": [
                {"rate_scale": s, "request_rate": r, self.key: summ.get(self.key),
                 "summary": summ}
                for s, r, summ in self.points
            ],
        }


def find_capacity(
    run: Callable[[float], Summary],
    *,
    lo: float,
    hi: float | None = None,
    target: float = 0.9,
    key: str = "slo_attainment",
    rel_tol: float = 0.02,
    max_iter: int = 12,
    on_point: Callable[[float, float, Summary], None] | None = None,
    max_expand: int = 10,
    seen: dict[float, Point] | None = None,
    factor: float = 2.0,
    decimals: int | None = None,
) -> CapacityResult:
    """Bisect (geometrically) for the highest ``rate_scale`` with ``run(s)[key] >= target``.

    Without ``hi`` the scale is multiplied by ``factor`` (default 2: doubles) from ``lo``
    until a run fails (at most ``max_expand`` times); if ``lo`` itself fails it is divided
    by ``factor`` instead. ``max_iter`` bounds the bisection steps, which stop once
    ``bad / good - 1 <= rel_tol``. ``on_point`` sees every evaluation as it happens
    (progress display, incremental JSON). ``seen`` (rate scale -> point) shares runs
    between searches for several targets on one workload, or hands in runs made before
    the search (a grid of fixed loads): a scale in it is not run again. With ``decimals``,
    every scale the search picks is rounded to that many (runs named by their scale).
    """
    if not lo > 0:
        raise ValueError(f"lo must be positive, got {lo}")
    if hi is not None and not hi > lo:
        raise ValueError(f"hi must exceed lo, got lo={lo} hi={hi}")
    if not factor > 1.0:
        raise ValueError(f"factor must exceed 1, got {factor}")
    if seen is None:
        seen = {}

    def pick(s: float) -> float:
        return s if decimals is None else round(s, decimals)

    def passes(s: float) -> bool:
        if s not in seen:
            summary = run(s)
            seen[s] = (s, request_rate_of(summary), summary)
            if on_point is not None:
                on_point(*seen[s])
        value = float(seen[s][2].get(key, float("nan")))
        return value >= target                   # NaN fails

    def result(scale: float, status: str) -> CapacityResult:
        points = sorted(seen.values(), key=lambda p: p[0])   # type: ignore[union-attr]
        rate = seen[scale][1] if scale in seen else 0.0
        return CapacityResult(scale, rate, points, target, key, status)

    good: float | None = None
    bad: float | None = None
    if passes(lo):
        good = lo
        if hi is not None:
            if passes(hi):
                return result(hi, "above_range")
            bad = hi
        else:
            s = lo
            for _ in range(max_expand):
                s = pick(s * factor)
                if not passes(s):
                    bad = s
                    break
                good = s
            if bad is None:
                return result(good, "above_range")
    else:
        bad = s = lo
        for _ in range(max_expand):
            s = pick(s / factor)
            if passes(s):
                good = s
                break
            bad = s
        if good is None:
            return result(0.0, "below_range")

    for _ in range(max_iter):
        if bad / good - 1.0 <= rel_tol:
            break
        mid = pick(math.sqrt(good * bad))   # geometric: rel_tol is a ratio
        if passes(mid):
            good = mid
        else:
            bad = mid
    return result(good, "ok")


def find_capacities(
    run: Callable[[float], Summary],
    *,
    lo: float,
    targets: tuple[float, ...] = (0.9, 0.99),
    **kw: Any,
) -> dict[float, CapacityResult]:
    """Capacity at each attainment target, sharing every run between the searches (a
    scale already run for one target is not run again for the next)."""
    seen: dict[float, Point] = {}
    return {t: find_capacity(run, lo=lo, target=t, seen=seen, **kw) for t in sorted(targets)}
