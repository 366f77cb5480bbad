"""Cluster-scale simulation: the cheap load view routes exactly as recomputing every load
at every arrival did; streaming requests through the loop (dropped as they leave) gives
the summary of keeping them; a routing decided in advance splits over processes with
the same result."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import fairbatch.sim.loop as loop
from fairbatch.sim.experiment import Scenario, prepare, run_policy


class _SlowLoads:
    """The reference: every instance's load recomputed (a new object) at every arrival
    whose view is ``interval`` or more seconds old, as the simulator did before
    ``sim.loads.LoadView``."""

    def __init__(self, instances, interval: float) -> None:
        self.instances = instances
        self.interval = interval
        self.loads = [None] * len(instances)

    def mark(self, k: int) -> None:
        pass

    def refresh(self, now: float):
        out = []
        for k, inst in enumerate(self.instances):
            ld = self.loads[k]
            if ld is None or now - ld.time >= self.interval:
                ld = self.loads[k] = inst.load(now)
            out.append(ld)
        return out


@pytest.fixture(scope="module")
def prep4():
    return prepare(Scenario(trace="azure-conv", num_requests=500, instances=4))


def _run(prep, router: str, interval: float, policy: str, scale: float):
    p = replace(prep, scenario=replace(prep.scenario, router=router, load_interval=interval))
    res = run_policy(p, policy, scale)
    summary = {k: v for k, v in res.summary.items() if k != "sim_wall_time_s"}
    return list(res.outcome.instance_of), json.dumps(summary, sort_keys=True)


@pytest.mark.parametrize("interval", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("router", ["least_requests", "llumnix", "admission", "admission:count_sent=false"])
@pytest.mark.parametrize("policy", ["fairbatching", "vllm", "fairbatching:late=reject"])
def test_load_view_routes_as_recomputing_every_load(prep4, monkeypatch, router, interval, policy) -> None:
    # overloaded (x14 on 4 instances): queues, preemptions and refusals change the loads
    fast = _run(prep4, router, interval, policy, 14.0)
    monkeypatch.setattr(loop, "LoadView", _SlowLoads)
    slow = _run(prep4, router, interval, policy, 14.0)
    assert fast[0] == slow[0]            # every request to the same instance
    assert fast[1] == slow[1]            # and the same summary, to the bit
    assert len(set(fast[0])) == 4
