"""The simulator's noisy executor: right on average, wrong in stretches."""

from __future__ import annotations

import numpy as np
import pytest

from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepFeatures, StepPlan
from fairbatch.sim.executor import NoisySimExecutor, SimExecutor

MODEL = LinearLatencyModel(0.01, 1e-5)


def durations(ex: SimExecutor, n: int) -> np.ndarray:
    plan = StepPlan(time_budget=1.0, token_budget=1)
    plan.features = StepFeatures(1, 100, 100, 100)
    return np.array([ex.execute(plan).duration for _ in range(n)])


def test_no_noise_is_the_model():
    assert np.allclose(durations(NoisySimExecutor(MODEL, 0.0), 10), MODEL.predict(StepFeatures(1, 100, 100, 100)))


def test_noise_is_unbiased_and_correlated():
    t = MODEL.predict(StepFeatures(1, 100, 100, 100))
    d = durations(NoisySimExecutor(MODEL, 0.05, 0.9, seed=1), 50_000) / t
    assert d.mean() == pytest.approx(1.0, abs=0.01)
    assert np.log(d).std() == pytest.approx(0.05, rel=0.1)
    lag1 = np.corrcoef(d[:-1], d[1:])[0, 1]
    assert lag1 == pytest.approx(0.9, abs=0.03)
    iid = durations(NoisySimExecutor(MODEL, 0.05, 0.0, seed=1), 20_000)
    assert abs(np.corrcoef(iid[:-1], iid[1:])[0, 1]) < 0.05


def test_bad_noise_parameters():
    with pytest.raises(ValueError):
        NoisySimExecutor(MODEL, -0.1)
    with pytest.raises(ValueError):
        NoisySimExecutor(MODEL, 0.05, 1.0)
