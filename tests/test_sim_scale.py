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

    def __init__(self, instances, interval: float, reads=None) -> None:
        self.instances = instances
        self.interval = interval
        self.loads = [None] * len(instances)   # full loads, whatever the router reads

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
@pytest.mark.parametrize("router", ["least_requests", "llumnix", "admission", "admission:count_sent=false",
                                    "least_requests:count_sent=false"])
@pytest.mark.parametrize("policy", ["fairbatching", "vllm", "fairbatching:late=reject"])
def test_load_view_routes_as_recomputing_every_load(prep4, monkeypatch, router, interval, policy) -> None:
    # overloaded (x14 on 4 instances): queues, preemptions and refusals change the loads
    fast = _run(prep4, router, interval, policy, 14.0)
    monkeypatch.setattr(loop, "LoadView", _SlowLoads)
    slow = _run(prep4, router, interval, policy, 14.0)
    assert fast[0] == slow[0]            # every request to the same instance
    assert fast[1] == slow[1]            # and the same summary, to the bit
    assert len(set(fast[0])) == 4


# --- streaming and splitting ------------------------------------------------------------------------
import numpy as np  # noqa: E402

from fairbatch.request import SLO  # noqa: E402
from fairbatch.sim.split import Cluster, Workload, run_cluster, split_reason  # noqa: E402
from fairbatch.workload import scale_rate  # noqa: E402

_RUN_ONLY = ("sim_wall_time_s", "request_rate", "num_preemptions", "requests_per_instance")


def _workload(prep, scale: float) -> Workload:
    entries = scale_rate(prep.entries, scale)
    return Workload(np.array([e.arrival for e in entries]), np.array([e.prompt_len for e in entries], np.int32),
                    np.array([e.output_len for e in entries], np.int32),
                    SLO(prep.scenario.ttft_slo, prep.scenario.tpot_slo))


@pytest.mark.parametrize("router", ["round_robin", "admission"])
def test_streamed_run_summarises_as_keeping_every_request(prep4, router) -> None:
    """Requests built one at a time and dropped as they leave: the summary of the run that
    keeps them all (run_policy), to the bit."""
    p = replace(prep4, scenario=replace(prep4.scenario, router=router))
    kept = run_policy(p, "fairbatching", 14.0)
    cluster = Cluster("fairbatching", p.config, p.num_blocks, p.latency, router)
    streamed = run_cluster(cluster, _workload(p, 14.0), 4)
    want = {k: v for k, v in kept.summary.items() if k not in _RUN_ONLY}
    assert json.dumps(streamed.summary.summary(), sort_keys=True) == json.dumps(want, sort_keys=True)
    assert streamed.assigned == kept.outcome.assigned and streamed.steps == kept.outcome.steps


def test_round_robin_splits_over_processes_exactly(prep4) -> None:
    cluster = Cluster("fairbatching:late=reject", prep4.config, prep4.num_blocks, prep4.latency, "round_robin")
    work = _workload(prep4, 14.0)
    one = run_cluster(cluster, work, 4, jobs=1)
    two = run_cluster(cluster, work, 4, jobs=2)
    assert (one.jobs, two.jobs) == (1, 2)
    assert json.dumps(one.summary.summary(), sort_keys=True) == json.dumps(two.summary.summary(), sort_keys=True)
    assert (one.steps, one.assigned, one.busy_time, one.end_time) == (two.steps, two.assigned, two.busy_time,
                                                                       two.end_time)


def test_load_aware_routers_are_not_split(prep4) -> None:
    assert split_reason("round_robin") is None
    for router in ("least_requests", "llumnix", "admission"):
        assert "cannot be simulated apart" in split_reason(router)
    cluster = Cluster("vllm", prep4.config, prep4.num_blocks, prep4.latency, "least_requests")
    assert run_cluster(cluster, _workload(prep4, 4.0), 4, jobs=2).jobs == 1


def test_streamed_requests_must_come_in_arrival_order(prep4) -> None:
    work = _workload(prep4, 1.0)
    reqs = list(work.requests())[:3]
    insts = Cluster("vllm", prep4.config, prep4.num_blocks, prep4.latency).instances(1)
    with pytest.raises(ValueError, match="arrival order"):
        loop.simulate(iter(reqs[::-1]), insts, keep_requests=False)
