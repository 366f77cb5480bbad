"""Pooled inter-token latencies at any scale: exact while few, a DDSketch when many.

vLLM pools every gap between consecutive output tokens of every successful request
(``ITL``). A day of cluster traffic has hundreds of millions of them: kept as float64
they alone would need gigabytes. So this keeps them exactly up to ``exact_limit`` gaps
(every bundled trace fits: the conversation trace has 4.1M output tokens) and, past it,
folds them into a DDSketch (Masson et al., VLDB 2019; the ``ddsketch`` package) per SLO
class:

- **Percentiles** (median included): within ``relative_accuracy`` (default 0.5 %) of the
  gap at that rank, whatever the distribution; ``np.percentile`` interpolates between
  two neighbouring gaps, a further difference of at most one gap to the next.
- **Mean and std**: exact up to float rounding (count, mean and sum of squared
  deviations, merged batch by batch with Chan et al.'s formula).

Gaps are added in numpy batches: each batch is bucketed with the sketch's own
logarithmic mapping, and each bucket goes into the sketch once, with its count as weight.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import numpy.typing as npt
from ddsketch import DDSketch

F64 = npt.NDArray[np.float64]

EXACT_LIMIT = 1 << 23             # 8.4M gaps (~270 MB with their request indices and token times)
RELATIVE_ACCURACY = 0.005         # the sketch's guarantee on every percentile


class GapSketch:
    """One sketched distribution: a DDSketch for the quantiles, moments for mean and std."""

    __slots__ = ("sketch", "n", "mean", "m2")

    def __init__(self, relative_accuracy: float = RELATIVE_ACCURACY) -> None:
        self.sketch = DDSketch(relative_accuracy)
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0     # sum of squared deviations from the mean

    def add(self, x: F64) -> None:
        if not len(x):
            return
        self._moments(len(x), float(np.mean(x)), float(np.var(x)) * len(x))
        mapping = self.sketch._mapping   # noqa: SLF001 (its public key/value methods only)
        pos = x > mapping.min_possible
        zeros = len(x) - int(pos.sum())
        if zeros:
            self.sketch.add(0.0, float(zeros))
        # the sketch's bucket of a value v is ceil(log_gamma(v)): computed for the whole batch
        # here, each bucket then added once through its own representative value (the middle
        # of the bucket, which the sketch maps back to the same key)
        keys = np.ceil(np.log2(x[pos]) * mapping._multiplier + mapping._offset).astype(np.int64)  # noqa: SLF001
        uniq, counts = np.unique(keys, return_counts=True)
        for k, c in zip(uniq.tolist(), counts.tolist()):
            self.sketch.add(mapping.value(k), float(c))

    def merge(self, other: GapSketch) -> None:
        self.sketch.merge(other.sketch)
        self._moments(other.n, other.mean, other.m2)

    def _moments(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def dist_ms(self, metric: str, percentiles: Sequence[float], key) -> dict[str, float]:
        """Summary keys as ``summary._dist`` writes them (0.0 for an empty set)."""
        if self.n == 0:
            out = {f"mean_{metric}_ms": 0.0, f"median_{metric}_ms": 0.0, f"std_{metric}_ms": 0.0}
            return out | {key(p, metric): 0.0 for p in percentiles}
        q = self.sketch.get_quantile_value
        out = {
            f"mean_{metric}_ms": self.mean * 1000.0,
            f"median_{metric}_ms": float(q(0.5)) * 1000.0,
            f"std_{metric}_ms": math.sqrt(self.m2 / self.n) * 1000.0,
        }
        for p in percentiles:
            out[key(p, metric)] = float(q(p / 100.0)) * 1000.0
        return out
