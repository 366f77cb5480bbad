"""SchedulerConfig is frozen and validated at construction: a typo or an out-of-range
value fails at once, naming the field, wherever the config is built or overridden
(``dataclasses.replace``, policy variants, the server's options, the simulator's)."""

from __future__ import annotations

import dataclasses

import pytest

from fairbatch.scheduler import SchedulerConfig
from fairbatch.scheduler.variant import parse_variant
from fairbatch.server.commands import scheduler_config_for

BAD = [
    ("max_num_batched_tokens", 0), ("max_num_seqs", -1), ("max_num_seqs", 2.5), ("max_model_len", 1),
    ("min_chunk", 0), ("chunk_align", 0), ("chunk_size", 0), ("chunk_recipe_context", -1),
    ("chunk_recipe_tpot", 0.0), ("ttft_slo", 0.0), ("tpot_slo", -0.05), ("tpot_slo", "50ms"),
    ("late", "drop"), ("late_deadline_factor", 0.0), ("failed_decode_gap", 0.0),
    ("ttft_margin", -0.1), ("tpot_margin", 1.0), ("qoserve_safety_factor", 0.9),
    ("qoserve_priority_weight", -1.0), ("qoserve_min_step_tokens", 3000), ("qoserve_max_step_tokens", 0),
    ("time_budget_min", 0.0), ("time_budget_max", 0.005), ("time_budget_max", float("inf")),
    ("time_budget_rule", "min_slack"), ("time_budget_rule", "max-slack"), ("prefill_work_weight", -0.001),
    ("defer_decodes", "false"), ("set_aside", 1), ("kv_pressure_usage", 0.0), ("kv_pressure_budget", 1.5),
    ("step_overrun_gain", 1.5), ("step_overrun_gain", float("nan")),
]


@pytest.mark.parametrize("name,value", BAD)
def test_a_bad_value_fails_at_construction_naming_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        SchedulerConfig(**{name: value})


def test_the_defaults_and_every_valid_rule_construct():
    SchedulerConfig()
    for rule in ("max-slack-tpot", "min-slack"):
        assert SchedulerConfig(time_budget_rule=rule).time_budget_rule == rule
    for late in ("serve", "relegate", "reject"):
        SchedulerConfig(late=late)


def test_frozen_overrides_go_through_replace_which_validates():
    cfg = SchedulerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_num_seqs = 8      # type: ignore[misc]
    assert dataclasses.replace(cfg, max_num_seqs=8).max_num_seqs == 8
    with pytest.raises(ValueError, match="time_budget_rule"):
        dataclasses.replace(cfg, time_budget_rule="min-slak")


def test_hosts_reject_typos_with_one_line():
    with pytest.raises(ValueError, match="time_budget_rule"):
        parse_variant("fairbatching:time_budget_rule=min-slak").config(SchedulerConfig())
    opts = dict(ttft_slo=1.0, tpot_slo=0.05, max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=None)
    with pytest.raises(ValueError, match="unknown scheduler option 'time_budget_rul'"):
        scheduler_config_for("fairbatching", **opts, scheduler_options={"time_budget_rul": "min-slack"})
    with pytest.raises(ValueError, match="set_aside"):
        scheduler_config_for("fairbatching", **opts, scheduler_options={"set_aside": "False"})
    cfg = scheduler_config_for("fairbatching", **opts, scheduler_options={"time_budget_rule": "min-slack"})
    assert cfg.time_budget_rule == "min-slack" and cfg.max_model_len == 1 << 30
