"""ttft_margin_quantile: first tokens planned ahead by a quantile of the delivery delays a
host reports (delivery_lead.py), for every policy; and the simulator reports its modelled
served delays to it."""

from __future__ import annotations

import pytest

from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.request import SLO, Request
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.scheduler.delivery_lead import DeliveryLead
from fairbatch.sim.experiment import Scenario, prepare, run_policy

MODEL = LinearLatencyModel(a=0.010, b=1e-4)


def test_lead_is_the_quantile_of_recent_delays() -> None:
    lead = DeliveryLead(0.9)
    for i in range(1000):
        lead.observe(i / 1000)            # 0 .. 999 ms; refreshed every 64 delays
    assert lead.lead == pytest.approx(0.9, abs=0.07)
    before = lead.lead
    for _ in range(100):
        lead.observe(float("nan"))        # ignored
        lead.observe(-1.0)
    assert lead.lead == before
    for _ in range(2000):                 # the window forgets the old delays
        lead.observe(0.3)
    assert lead.lead == 0.3


@pytest.mark.parametrize("policy", policy_names())
def test_first_tokens_planned_ahead_by_reported_delays(policy: str) -> None:
    cfg = SchedulerConfig(ttft_margin=0.05, ttft_margin_quantile=0.9,
                          chunk_size=512 if policy == "sarathi" else None)
    sched = make_scheduler(policy, cfg, BlockAllocator(100), MODEL)
    early = Request("early", 0.0, 10, 4, SLO(1.0, 0.05))
    sched.add(early, 0.0)
    assert early.deadline == pytest.approx(0.95)      # no reports yet: ttft_margin
    for _ in range(200):
        sched.observe_delivery(0.2)
    late = Request("late", 0.0, 10, 4, SLO(1.0, 0.05))
    sched.add(late, 0.0)
    assert late.deadline == pytest.approx(0.8)        # the reported delays, larger
    assert late.slo.ttft == 1.0                       # the SLO itself is unchanged


def test_off_by_default_reports_change_nothing() -> None:
    sched = make_scheduler("fairbatching", SchedulerConfig(ttft_margin=0.05), BlockAllocator(100), MODEL)
    for _ in range(200):
        sched.observe_delivery(0.2)
    r = Request("r", 0.0, 10, 4, SLO(1.0, 0.05))
    sched.add(r, 0.0)
    assert r.deadline == pytest.approx(0.95)


def test_simulated_served_delay_reaches_the_scheduler() -> None:
    """With a modelled served delay, the adaptive lead keeps more first tokens on time than
    the same scheduler without it (code trace, 300 requests past capacity)."""
    def att(opts: dict) -> float:
        sc = Scenario(trace="azure-code", num_requests=300, served_offset=0.15, served_offset_cv=1.0,
                      scheduler=opts)
        return run_policy(prepare(sc), "fairbatching", 1.0).summary["ttft_attainment"]
    assert att({"ttft_margin_quantile": 0.9}) > att({})


def test_server_reports_first_token_delivery_to_the_scheduler() -> None:
    """Through the API server (engine on a thread): every streamed and non-streamed answer's
    first token is reported with the step deltas that follow it, and later requests are
    planned ahead by the delays seen."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from fairbatch.server import ServerThread, build_app, load_served_model
    from support import wait_for

    model = load_served_model("tiny-llama", load_format="dummy", policy="fairbatching", cpu_threads=1,
                              ttft_slo=60.0, tpot_slo=5.0, max_model_len=512,
                              scheduler_options={"ttft_margin_quantile": 0.5})
    lead = model.scheduler._delivery
    app = build_app(model)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        for stream in (False, True, False, True):
            r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hello there", "max_tokens": 4,
                                                "stream": stream})
            assert r.status_code == 200
        # the last answer's report rides on a later step's deltas: one more request sends it
        c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "again", "max_tokens": 2})
        wait_for(lambda: len(lead._delays) >= 4, what="delivery delays reported to the scheduler")
    assert all(0.0 <= d < 60.0 for d in lead._delays) and lead.lead > 0.0
