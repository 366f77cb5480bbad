"""Linear step-time model fitted from measured steps.

``t = a + b*new_tokens + c*context_tokens + d*attention_pairs + e*num_seqs``: the GEMMs
scale with new tokens, attention reads KV (context tokens, memory bound for decodes) and
multiplies query-key pairs (compute bound for prefill chunks), and each sequence costs a
little bookkeeping. Cheap enough to evaluate after every chunk a policy considers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepFeatures

FEATURE_NAMES = ("intercept", "new_tokens", "context_tokens", "attention_pairs", "num_seqs")


def feature_row(f: StepFeatures) -> list[float]:
    return [1.0, float(f.new_tokens), float(f.context_tokens), float(f.attention_pairs), float(f.num_seqs)]


@dataclass
class LinearLatencyModel(LatencyModel):
    a: float            # seconds per step
    b: float            # seconds per new token
    c: float = 0.0      # seconds per attended context token
    d: float = 0.0      # seconds per query-key pair
    e: float = 0.0      # seconds per sequence
    meta: dict[str, Any] | None = None   # provenance: model, gpu, fit error, sample count

    kind = "linear"

    def predict(self, f: StepFeatures) -> float:
        return (self.a + self.b * f.new_tokens + self.c * f.context_tokens
                + self.d * f.attention_pairs + self.e * f.num_seqs)

    def max_chunk(self, base: StepFeatures, cached: int, limit: int, budget: float) -> int:
        # predict(base + chunk k) = t0 + (b + c + d*(cached + 1/2)) k + (d/2) k^2 + (c*cached + e)
        if limit <= 0:
            return 0
        slack = budget - self.predict(base) - self.e - self.c * cached
        lin = self.b + self.c + self.d * (cached + 0.5)
        quad = 0.5 * self.d
        if quad > 0:
            disc = lin * lin + 4 * quad * slack
            if disc < 0:
                return 0
            k = (-lin + math.sqrt(disc)) / (2 * quad)
        elif lin > 0:
            k = slack / lin
        else:
            return limit if slack >= 0 else 0
        if k < 1:
            return 0
        return min(limit, int(k + 1e-9))

    # --- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: Iterable[tuple[StepFeatures, float]], meta: dict[str, Any] | None = None) -> "LinearLatencyModel":
        """Non-negative least squares on relative error, so short decode steps weigh as
        much as long prefills (a 1 ms error matters at 6 ms, not at 600 ms)."""
        from scipy.optimize import nnls

        feats, times = zip(*samples) if samples else ((), ())
        if len(times) < len(FEATURE_NAMES):
            raise ValueError(f"need at least {len(FEATURE_NAMES)} samples to fit, got {len(times)}")
        X = np.array([feature_row(f) for f in feats], dtype=float)
        y = np.array(times, dtype=float)
        if np.any(y <= 0):
            raise ValueError("measured step times must be positive")
        w = 1.0 / y
        scale = np.maximum(np.abs(X).max(axis=0), 1e-12)   # conditioning: columns differ by 1e9
        coef, _ = nnls((X / scale) * w[:, None], y * w)
        coef = coef / scale
        model = cls(*map(float, coef), meta=dict(meta or {}))
        model.meta["num_samples"] = len(y)
        return model

    def scaled(self, factor: float) -> "LinearLatencyModel":
        """The same model with every prediction multiplied by ``factor``."""
        return LinearLatencyModel(self.a * factor, self.b * factor, self.c * factor, self.d * factor,
                                  self.e * factor, meta=dict(self.meta or {}))

    def relative_errors(self, samples: Sequence[tuple[StepFeatures, float]]) -> np.ndarray:
        return np.array([abs(self.predict(f) - t) / t for f, t in samples])

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "coefficients": dict(zip(FEATURE_NAMES, (self.a, self.b, self.c, self.d, self.e))),
                "meta": self.meta or {}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearLatencyModel":
        if data.get("kind") != "linear":
            raise ValueError(f"not a linear latency profile (kind={data.get('kind')!r})")
        co = data["coefficients"]
        return cls(*(float(co.get(n, 0.0)) for n in FEATURE_NAMES), meta=data.get("meta") or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LinearLatencyModel":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"latency profile not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"latency profile {p} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"latency profile {p} is malformed: {e}") from None
