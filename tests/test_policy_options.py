"""Each policy declares the SchedulerConfig fields it reads beyond the shared ones
(``Scheduler.reads``), and a setting given to one policy that it does not read is an
error naming the policies that do read it: in a policy variant, a server's or ``tune``'s
``--set``, the vLLM plugin's config. The declarations are checked against what each policy
actually reads, so they cannot rot."""

from __future__ import annotations

import random

import pytest

from fairbatch.kv import BlockAllocator
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepResult
from fairbatch.request import SLO, Request
from fairbatch.scheduler import SchedulerConfig, make_scheduler, policy_names
from fairbatch.scheduler.base import OPTIONS, SHARED_OPTIONS, check_policy_options, policy_options
from fairbatch.scheduler.variant import parse_variant

MODEL = LinearLatencyModel(a=0.005, b=4e-5, c=2e-7, d=1e-10, e=2e-5)


class RecordingConfig:
    """A SchedulerConfig stand-in that records the name of every field read from it."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self._cfg = cfg
        self.read: set[str] = set()

    def __getattr__(self, name: str):      # only for names not set on the recorder itself
        self.read.add(name)
        return getattr(self._cfg, name)


def _fields_read(policy: str, late: str) -> set[str]:
    """Run ``policy`` through an overload on a small KV cache (late prompts, relegated
    decodes, preemption, KV pressure, steps overrunning the model) and return the config
    fields it read."""
    cfg = RecordingConfig(SchedulerConfig(late=late, max_num_seqs=64))
    sched = make_scheduler(policy, cfg, BlockAllocator(400, 16), MODEL)   # type: ignore[arg-type]
    rng = random.Random(0)
    arrivals = sorted((rng.uniform(0.0, 4.0), i) for i in range(160))
    now, i = 0.0, 0
    while i < len(arrivals) or sched.has_work():
        while i < len(arrivals) and arrivals[i][0] <= now:
            t, n = arrivals[i]
            slo = SLO(0.5, 0.03) if n % 3 == 0 else SLO(2.0, 0.1)
            req = Request(f"r{n}", t, rng.randint(16, 1500), rng.randint(1, 120), slo, priority=n % 3)
            sched.add(req, now)
            i += 1
        plan = sched.schedule(now)
        if not plan.chunks:
            now = arrivals[i][0] if i < len(arrivals) else now + 0.01
            continue
        took = MODEL.predict(plan.features) * 1.1        # steps 10 % slower than the model
        now += took
        sched.on_step_end(plan, StepResult(took), now)
        sched.load(now)
        if sched.stats.steps == 50:
            sched.latency_model_changed()
    assert sched.stats.finished + sched.stats.rejected == len(arrivals)
    assert sched.stats.preemptions and (late == "serve" or sched.stats.relegated + sched.stats.rejected)
    return cfg.read


@pytest.mark.parametrize("policy", policy_names())
def test_a_policy_reads_exactly_the_fields_it_declares(policy):
    read = set().union(*(_fields_read(policy, late) for late in ("serve", "relegate", "reject")))
    assert read <= OPTIONS, f"{policy} reads {sorted(read - OPTIONS)}, which are no fields"
    cls_reads = policy_options(policy) - SHARED_OPTIONS
    undeclared = read - SHARED_OPTIONS - cls_reads
    assert not undeclared, f"{policy} reads {sorted(undeclared)}: add them to its `reads`"
    unread = cls_reads - read
    assert not unread, f"{policy} declares {sorted(unread)} but never read them here"


def test_every_field_is_shared_or_some_policy_reads_it():
    owned = set().union(*(policy_options(p) for p in policy_names()))
    assert owned == OPTIONS


@pytest.mark.parametrize("spec, message", [
    ("sarathi:time_budget_min=0.02", "time_budget_min is an option of fairbatching; sarathi does not read it"),
    ("vllm:chunk_align=32", "chunk_align is an option of fairbatching, qoserve, sarathi; vllm does not read it"),
    ("vllm-priority:qoserve_safety_factor=1.5", "qoserve_safety_factor is an option of qoserve; vllm-priority"),
    ("prefill-first:failed_decode_gap=2", "failed_decode_gap is an option of fairbatching, qoserve; prefill-first"),
    ("fairbatching:chunk_size=512", "chunk_size is an option of sarathi; fairbatching does not read it"),
])
def test_a_variant_may_set_only_what_its_policy_reads(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(spec)


def test_shared_options_and_the_policies_own_are_accepted():
    for spec in ("vllm:max_num_batched_tokens=2048,late=serve,ttft_margin=0.1",
                 "vllm-priority:max_num_batched_tokens=4096", "sarathi:chunk_size=1536,late=reject",
                 "fairbatching:set_aside=false,prefill_work_weight=0.0005", "fairbatching:tpot_margin=0.1",
                 "qoserve:qoserve_priority_weight=0.032", "qoserve:step_overrun_gain=0",
                 "prefill-first:late_deadline_factor=8"):
        parse_variant(spec).config(SchedulerConfig())
    with pytest.raises(ValueError, match="unknown scheduler option 'chunksize'; sarathi reads .*chunk_size"):
        check_policy_options("sarathi", ["chunksize"])
    with pytest.raises(ValueError, match="unknown policy"):
        check_policy_options("nope", [])


def test_serve_and_tune_refuse_an_option_the_policy_does_not_read():
    from typer.testing import CliRunner

    from fairbatch.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", "tiny-llama", "--load-format", "dummy", "--port", "0",
                                 "--policy", "sarathi", "--set", "time_budget_min=0.02"])
    assert r.exit_code == 2 and "time_budget_min is an option of fairbatching; sarathi" in r.output, r.output
    r = CliRunner().invoke(app, ["tune", "--policy", "vllm", "--set", "chunk_size=512"])
    assert r.exit_code == 2 and "chunk_size is an option of sarathi; vllm does not read it" in r.output, r.output


def test_the_vllm_plugin_checks_the_final_policy():
    pytest.importorskip("pydantic")
    from fairbatch.integrations.vllm_config import load_plugin_config

    sizes = dict(max_num_batched_tokens=1024, max_num_seqs=8, max_model_len=512)
    # a later source may change the policy: only the final one counts
    cfg = load_plugin_config({"fairbatch": {"policy": "sarathi"}}, environ={"FAIRBATCH_CHUNK_SIZE": "256"})
    assert cfg.scheduler_config(**sizes).chunk_size == 256
    cfg = load_plugin_config({"fairbatch": {"policy": "sarathi", "time_budget_max": 0.3}}, environ={})
    with pytest.raises(ValueError, match="fairbatch: time_budget_max is an option of fairbatching; sarathi"):
        cfg.scheduler_config(**sizes)
