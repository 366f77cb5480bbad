"""Routing policies alone and in the cluster simulator: every policy x router on small
workloads loses no request and uses every instance; `admission` never picks an instance
whose budget is exhausted while another has room; stale loads plus the router's own
sent-since-poll accounting; `fairbatch simulate --instances N --router R`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from fairbatch.cli import app as cli
from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator
from fairbatch.request import DeadlineRule
from fairbatch.routing import AdmissionRouter, make_router, parse_router_spec, router_names
from fairbatch.scheduler import make_scheduler
from fairbatch.scheduler.base import Load
from fairbatch.sim import SimExecutor, simulate
from fairbatch.sim.experiment import Scenario, capacity, prepare, run_policy
from fairbatch.workload import make_requests, scale_rate

ROUTERS = ["round_robin", "least_requests", "llumnix", "admission", "prefix"]
POLICIES = ["vllm", "sarathi", "fairbatching"]


def load(running=0, waiting=0, free=1000, blocks=1000, queued=0, budget=1e4, t=0.0) -> Load:
    return Load(running=running, waiting=waiting, kv_usage=1 - free / blocks, free_blocks=free, num_blocks=blocks,
                queued_prefill_tokens=queued, admission_budget=budget, time=t)


# --- the policies alone ---------------------------------------------------------------------------
def test_router_names_and_specs() -> None:
    assert router_names() == ROUTERS
    assert parse_router_spec("least-requests:count_sent=false") == ("least_requests", {"count_sent": False})
    assert make_router("admission:block_size=32").block_size == 32
    for bad, msg in [("nope", "unknown router"), ("admission:x=1", "unknown router option"),
                     ("admission:count_sent=maybe", "true or false"), ("llumnix:block_size=0", ">= 1"),
                     ("admission:count_sent", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=msg):
            make_router(bad)


def test_round_robin_cycles_and_skips_excluded() -> None:
    r = make_router("round_robin")
    loads = [load()] * 3
    assert [r.choose(10, loads) for _ in range(4)] == [0, 1, 2, 0]
    assert [r.choose(10, loads, candidates=[0, 2]) for _ in range(3)] == [2, 0, 2]


def test_least_requests_counts_running_waiting_and_sent() -> None:
    r = make_router("least_requests")
    loads = [load(running=3, waiting=1), load(running=1, waiting=1), load(running=2)]
    # 4, 2, 2 requests: #1 (lowest index of the tie); then #1 has 2 + 1 sent: #2; then a tie again
    assert [r.choose(10, loads) for _ in range(3)] == [1, 2, 1]
    raw = make_router("least_requests:count_sent=false")
    assert [raw.choose(10, loads) for _ in range(3)] == [1, 1, 1]   # the stale view herds


def test_llumnix_freeness() -> None:
    r = make_router("llumnix:count_sent=false")
    # free 900 - 400/16 queued blocks over 10 requests = 87.5; 300 over 2 = 150; empty instance: infinite
    loads = [load(running=8, waiting=2, free=900, queued=400), load(running=2, free=300), load(free=50)]
    assert r.choose(10, loads) == 2
    assert r.choose(10, loads[:2]) == 1
    assert r.freeness(loads[0], 0) == pytest.approx((900 - 25) / 10)


def test_admission_largest_covering_budget_else_least_overcommitted() -> None:
    r = AdmissionRouter(count_sent=False)
    loads = [load(budget=300), load(budget=5000), load(budget=1200)]
    assert r.choose(1000, loads) == 1                       # largest of those covering
    assert r.choose(1000, [load(budget=300), load(budget=1200)]) == 1
    assert r.choose(2000, [load(budget=-50), load(budget=1500), load(budget=-10)]) == 1  # least over
    assert r.choose(2000, [load(budget=-50), load(budget=-900), load(budget=-10)]) == 2
    assert r.choose(10, [load(budget=float("nan")), load(budget=-5)]) == 1
    assert r.choose(10, [load(budget=-5), load(budget=5000)], candidates=[0]) == 0


def test_admission_counts_what_it_sent_since_the_poll() -> None:
    r = make_router("admission")
    loads = [load(budget=2000), load(budget=1500)]
    assert [r.choose(600, loads) for _ in range(4)] == [0, 1, 0, 1]   # 1400/1500, 1400/900, 800/900, 800/300
    assert r.sent_tokens == [1200, 1200] and r.sent_reqs == [2, 2]
    fresh = [load(budget=2000), loads[1]]            # a new Load object for #0: its count resets
    assert r.choose(600, fresh) == 0 and r.sent_reqs == [1, 2]


def test_observe_keeps_sends_after_the_poll_was_issued() -> None:
    r = make_router("least_requests")
    loads = [load(), load(running=5)]
    for _ in range(3):
        r.choose(10, loads)                          # all to #0
    since = r.num_sent - 1                           # the poll was issued before the 3rd send
    fresh = load(running=2)
    r.observe(0, fresh, since)
    assert r.sent_reqs[0] == 1 and r.sent_tokens[0] == 10
    loads[0] = fresh
    assert r.choose(10, loads) == 0                  # 2 + 1 = 3 < 5


def test_choose_is_linear_and_rejects_nothing_to_route_to() -> None:
    r = make_router("admission")
    with pytest.raises(ValueError):
        r.choose(1, [])
    with pytest.raises(ValueError):
        r.choose(1, [load()], candidates=[])
    many = [load(budget=float(i)) for i in range(1000)]
    assert r.choose(1, many) == 999


# --- in the simulator -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prep_conv():
    return prepare(Scenario(trace="azure-conv", num_requests=240, instances=3))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("router", ROUTERS)
def test_every_policy_x_router_loses_nothing_and_uses_every_instance(prep_conv, policy, router) -> None:
    prep = replace(prep_conv, scenario=replace(prep_conv.scenario, router=router, load_interval=0.05))
    res = run_policy(prep, policy, rate_scale=8.0)
    out = res.outcome
    assert len(out.requests) == 240
    assert out.unfinished == 0 and out.rejected == 0
    assert all(r.finished for r in out.requests)
    assert sum(out.assigned) == 240
    assert all(a > 0 for a in out.assigned), out.assigned
    assert res.summary["requests_per_instance"] == out.assigned
    assert res.summary["completed"] == 240


class _CheckedAdmission(AdmissionRouter):
    """Records, per decision, whether it picked an exhausted instance while another had room."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.decisions = 0
        self.violations: list[tuple[int, list[float]]] = []
        self.fallbacks = 0

    def _pick(self, prompt_len, loads, cand):
        k = super()._pick(prompt_len, loads, cand)
        budgets = [self.budget(loads[i], i) for i in cand]
        self.decisions += 1
        if any(b >= prompt_len for b in budgets):
            if self.budget(loads[k], k) < prompt_len:
                self.violations.append((prompt_len, budgets))
        else:
            self.fallbacks += 1
            if self.budget(loads[k], k) < max(budgets):
                self.violations.append((prompt_len, budgets))
        return k


@pytest.mark.parametrize("load_interval", [0.0, 0.2])
@pytest.mark.parametrize("policy", ["fairbatching", "vllm"])
def test_admission_never_picks_an_exhausted_instance_while_another_has_room(policy, load_interval) -> None:
    prep = prepare(Scenario(trace="azure-code", num_requests=300, instances=3))
    entries = scale_rate(prep.entries, 20.0)         # overload: budgets do run out
    reqs = make_requests(entries, prep.slos, deadline_rule=DeadlineRule.TPOT_SAFE)
    # vllm's budget is the free KV: a small cache makes it run out too
    blocks = prep.num_blocks if policy == "fairbatching" else 2048
    insts = [Instance(make_scheduler(policy, replace(prep.config), BlockAllocator(blocks, 16), prep.latency),
                      SimExecutor(prep.latency), name=f"i{k}") for k in range(3)]
    router = _CheckedAdmission()
    out = simulate(reqs, insts, router, load_interval=load_interval)
    assert out.unfinished == 0 and sum(out.assigned) == 300
    assert router.decisions == 300
    assert router.fallbacks > 0, "the workload should exhaust every budget at times"
    assert router.violations == []


class _Recorder:
    """Any router, with its choices recorded."""

    def __init__(self, spec: str) -> None:
        self.inner = make_router(spec)
        self.uses_load = self.inner.uses_load
        self.picks: list[int] = []

    def choose(self, prompt_len, loads):
        k = self.inner.choose(prompt_len, loads)
        self.picks.append(k)
        return k


def _longest_run(picks: list[int]) -> int:
    best = run = 1
    for a, b in zip(picks, picks[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


@pytest.mark.parametrize("router", ["least_requests", "llumnix", "admission"])
def test_stale_loads_herd_without_sent_accounting(prep_conv, router) -> None:
    """With a 1 s stale view, the raw policies send whole bursts to the one instance that
    looked best at the last poll; counting what the router sent since then spreads them."""
    def longest(spec: str) -> int:
        entries = scale_rate(prep_conv.entries, 8.0)
        reqs = make_requests(entries, prep_conv.slos)
        insts = [Instance(make_scheduler("fairbatching", replace(prep_conv.config),
                                         BlockAllocator(prep_conv.num_blocks, 16), prep_conv.latency),
                          SimExecutor(prep_conv.latency)) for _ in range(3)]
        rec = _Recorder(spec)
        out = simulate(reqs, insts, rec, load_interval=1.0)
        assert out.unfinished == 0 and len(rec.picks) == len(reqs)
        return _longest_run(rec.picks)

    counted, raw = longest(router), longest(f"{router}:count_sent=false")
    assert counted * 4 <= raw, (counted, raw)


def test_capacity_search_over_a_cluster() -> None:
    prep = prepare(Scenario(trace="azure-conv", num_requests=150, instances=2, router="admission"))
    res = capacity(prep, "fairbatching", rel_tol=0.1)
    assert res.status == "ok" and res.request_rate > prep.base_rate
    assert all(p["summary"]["requests_per_instance"][0] > 0 for p in res.to_dict()["points"])


def test_simulate_cli_with_instances_and_router(tmp_path) -> None:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["simulate", "--num-requests", "120", "--instances", "2", "--router",
                                   "llumnix", "--policy", "fairbatching", "--no-sweep", "--load-interval", "0.1",
                                   "--json", str(out), "--out", str(tmp_path / "o"), "--jobs", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["scenario"]["router"] == "llumnix" and report["scenario"]["instances"] == 2
    per = report["runs"][0]["requests_per_instance"]
    assert len(per) == 2 and all(n > 0 for n in per) and sum(per) == 120
    bad = CliRunner().invoke(cli, ["simulate", "--num-requests", "50", "--instances", "2", "--router", "nope"])
    assert bad.exit_code == 2 and "unknown router" in bad.output
