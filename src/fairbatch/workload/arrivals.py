"""Arrival processes: to time lengths-only traces, or to re-time any trace.

Both follow ``vllm bench serve``: the first request arrives at 0.0 and the gaps are
i.i.d. gamma with shape ``burstiness`` and mean ``1 / rate`` (burstiness 1.0 is Poisson;
below 1 is burstier, the gaps' coefficient of variation being ``1 / sqrt(burstiness)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .trace import TraceEntry


@runtime_checkable
class ArrivalProcess(Protocol):
    rate: float

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` non-decreasing arrival times in seconds, the first at 0.0."""
        ...


def _check_rate(rate: float) -> None:
    # inf is allowed: every request at time 0, as vLLM's --request-rate inf.
    if not rate > 0:
        raise ValueError(f"arrival rate must be positive (requests/s), got {rate}")


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    out = np.zeros(len(gaps) + 1)
    np.cumsum(gaps, out=out[1:])
    return out


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"number of arrivals must be >= 0, got {n}")


@dataclass(frozen=True, slots=True)
class PoissonArrivals:
    """Poisson arrivals at ``rate`` requests per second."""

    rate: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        _check_n(n)
        if n == 0:
            return np.zeros(0)
        if math.isinf(self.rate):
            return np.zeros(n)
        return _from_gaps(rng.exponential(1.0 / self.rate, size=n - 1))


@dataclass(frozen=True, slots=True)
class GammaArrivals:
    """Gamma-renewal arrivals: mean ``rate`` req/s, gap CV ``1 / sqrt(burstiness)``."""

    rate: float
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        _check_rate(self.rate)
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness (gamma shape) must be positive, got {self.burstiness}")

    @property
    def cv(self) -> float:
        """Coefficient of variation of the inter-arrival gaps."""
        return 1.0 / math.sqrt(self.burstiness)

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        _check_n(n)
        if n == 0:
            return np.zeros(0)
        if math.isinf(self.rate):
            return np.zeros(n)
        scale = 1.0 / (self.rate * self.burstiness)   # mean gap = shape * scale = 1 / rate
        return _from_gaps(rng.gamma(self.burstiness, scale, size=n - 1))


def retime(entries: Sequence[TraceEntry], process: ArrivalProcess, seed: int = 0
           ) -> list[TraceEntry]:
    """The same requests, in the same order, with arrivals drawn from ``process``."""
    times = process.times(len(entries), np.random.default_rng(seed)).tolist()
    return [TraceEntry(t, e.prompt_len, e.output_len, e.tag, e.hash_ids)
            for t, e in zip(times, entries, strict=True)]
