"""A step-time model that starts from a prior and refits itself from measured steps.

Used where the vLLM plugin runs on hardware nobody profiled, and by ``fairbatch serve
--refit-latency`` where the serving host's steps differ from the profile's: the policy
holds one ``OnlineLatencyModel``, and ``Scheduler.latency_model_changed()`` re-derives
what it computed from the model once a refit is accepted. The
refit is ``LinearLatencyModel.fit`` (non-negative least squares on relative error) over
a window of recent steps, and is accepted only when the window shows both decodes and
prefill chunks (otherwise the fit could not tell a token's cost from a sequence's) and
the fit explains the window (median relative error under ``max_rel_error``).

The fit is then calibrated: scaled so that it predicts the window's *total* time. A
relative-error fit matches the typical step, but deadlines are kept on the wall clock,
where the long tail (a garbage collection, a big hand-off, a slow host) adds up; a policy
that spends slack exactly (FairBatching) turns a model 5 % short on average into tokens
5 % late, which is a missed TPOT SLO for every request it paced at its deadline.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from fairbatch.latency.base import LatencyModel
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepFeatures


class OnlineLatencyModel(LatencyModel):
    kind = "online"

    def __init__(self, initial: LatencyModel, *, refit: bool = True, refit_every: int = 50,
                 window: int = 2000, min_samples: int = 40, max_rel_error: float = 0.5,
                 min_prefill_samples: int = 4) -> None:
        self.initial = initial
        self.current: LatencyModel = initial
        self.refit_enabled = refit
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.max_rel_error = max_rel_error
        self.min_prefill_samples = min_prefill_samples
        self._samples: deque[tuple[StepFeatures, float]] = deque(maxlen=window)
        self._since_refit = 0
        self.num_observed = 0
        self.refits = 0
        self.refit_attempts = 0           # windows looked at (accepted, rejected or too thin)
        self.rejected_refits = 0
        self.last_fit_error: float | None = None

    # --- LatencyModel ------------------------------------------------------------------
    def predict(self, f: StepFeatures) -> float:
        return self.current.predict(f)

    def max_chunk(self, base: StepFeatures, cached: int, limit: int, budget: float) -> int:
        return self.current.max_chunk(base, cached, limit, budget)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "current": self.current.to_dict(), "refits": self.refits,
                "refit_attempts": self.refit_attempts, "rejected_refits": self.rejected_refits, "observed_steps": self.num_observed,
                "last_fit_median_rel_error": self.last_fit_error}

    # --- online fitting ----------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def observe(self, f: StepFeatures, seconds: float) -> bool:
        """Record one measured step; returns True when this triggered an accepted refit."""
        if not (seconds > 0 and math.isfinite(seconds)) or f.new_tokens <= 0:
            return False
        self._samples.append((f.copy(), float(seconds)))
        self.num_observed += 1
        self._since_refit += 1
        if (self.refit_enabled and self._since_refit >= self.refit_every
                and len(self._samples) >= self.min_samples):
            return self.refit()
        return False

    def refit(self) -> bool:
        """Fit the window now; keep the new model only if it is trustworthy."""
        self._since_refit = 0
        self.refit_attempts += 1
        samples = list(self._samples)
        prefills = sum(1 for f, _ in samples if f.new_tokens > f.num_seqs)
        if len(samples) < 5 or prefills < self.min_prefill_samples or prefills == len(samples):
            return False
        try:
            model = LinearLatencyModel.fit(samples, meta={"source": "online refit"})
        except Exception:  # noqa: BLE001 - a degenerate window (scipy may raise): keep the old model
            self.rejected_refits += 1
            return False
        predicted = sum(model.predict(f) for f, _ in samples)
        if predicted > 0:
            bias = sum(t for _, t in samples) / predicted
            model = model.scaled(bias)
            model.meta["calibration"] = bias
        err = float(np.median(model.relative_errors(samples)))
        if not math.isfinite(err) or err > self.max_rel_error or model.predict(StepFeatures(1, 1, 1, 1)) <= 0:
            self.rejected_refits += 1
            return False
        model.meta["median_rel_error"] = err
        self.current = model
        self.refits += 1
        self.last_fit_error = err
        return True
