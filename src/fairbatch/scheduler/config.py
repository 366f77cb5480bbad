"""SchedulerConfig: the frozen, validated settings of every policy, grouped into shared,
per-policy and research knobs, and the names of the shared ones (SHARED_OPTIONS). Which
policy reads which per-policy field is declared on each policy class (``reads``) and
checked by ``base.check_policy_options``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from fairbatch.scheduler.late import Late


TimeBudgetRule = Literal["max-slack-tpot", "min-slack"]
TIME_BUDGET_RULES: tuple[str, ...] = get_args(TimeBudgetRule)
LateMode = Literal["serve", "relegate", "reject"]     # late.Late's values

# vLLM's defaults for an H100/H200-class GPU (>= 70 GB; vllm/engine/arg_utils.py), which the
# simulator models and docs/RESULTS.md was run with
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 1024


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of every policy. Frozen and validated at construction: change a copy with
    ``dataclasses.replace(cfg, field=value)``, which validates again; a bad value raises
    ValueError naming the field.

    Three groups. **Shared** (``SHARED_OPTIONS``): the limits, the default SLO and late
    handling, read by every policy. **Per policy**: each policy class names the ones it
    reads (``Scheduler.reads``); a policy variant or a server's ``--set`` that sets one its
    policy does not read is an error (``check_policy_options``). **Research knobs**: rules
    measured and kept off, or at a default nobody needs to change (docs/ALGORITHM.md has
    the measurements); they are per-policy options like the others."""

    # === shared: every policy reads these (SHARED_OPTIONS) ===================================
    # --- limits of a step and of the running batch
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS   # vllm: token budget per step
    # requests running at once. This default is the simulator's; the engine and server pass
    # their own, 256 by default (engine.llm.EngineArgs.max_num_seqs says why they differ)
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_model_len: int = 8192            # context limit (prompt + output)
    # --- default SLO for requests that carry none (seconds)
    ttft_slo: float = 1.0
    tpot_slo: float = 0.05
    # --- what happens to requests that can no longer meet their SLO (late.py):
    # "serve" (in the policy's order), "relegate" (behind everyone on time; it only
    # reorders, so it is the default of an SLO-aware server), "reject"
    late: LateMode = "relegate"
    # --- plan first tokens this many seconds before their TTFT deadline, room for what a
    # server adds after the step (IPC, detokenizing, streaming); at most half the TTFT.
    # The SLO is unchanged (docs/ALGORITHM.md, "The served stack")
    ttft_margin: float = 0.0
    # or, when larger, this quantile of the first-token delivery delays the host reports
    # (Scheduler.observe_delivery; delivery_lead.py). None: ttft_margin alone
    ttft_margin_quantile: float | None = None

    # === per policy: Scheduler.reads of each policy names the ones it reads ==================
    # --- prefill chunks of the deadline-driven policies (fairbatching, qoserve; chunk.py);
    # sarathi rounds its recipe's budget to chunk_align too
    min_chunk: int = 16                  # smallest prefill chunk worth a step
    chunk_align: int = 16                # round prefill chunks down to a multiple of this
    # --- sarathi: fixed token budget; None = Sarathi-Serve's recipe (largest step meeting TPOT)
    chunk_size: int | None = None
    chunk_recipe_tpot: float | None = None   # TPOT the recipe sizes for (None: the default tpot_slo)
    # --- qoserve (Niyama; values of its public scheduler)
    qoserve_safety_factor: float = 1.2       # predicted step time x this must fit the least decode slack
    qoserve_priority_weight: float = 0.008   # s per remaining prefill token added to its deadline (0: EDF)
    qoserve_min_step_tokens: int = 128       # tokens a step may always hold, slack or not (prompts keep moving)
    qoserve_max_step_tokens: int = 2552      # most tokens a step with prefill holds (its largest chunk)
    # --- fairbatching
    time_budget_min: float = 0.010       # T_min, seconds
    time_budget_max: float = 0.250       # T_max, seconds
    # pace tokens this fraction inside the TPOT SLO: room for steps that overrun the
    # step-time model, which FairBatching (filling every step to its deadline) has none of
    tpot_margin: float = 0.0
    # seconds added to a prompt's deadline per prompt token still to compute
    # when ordering prefills (0: earliest deadline first). None: 0 when late requests are
    # relegated or rejected (the set-aside below and relegation handle long prompts), 8 ms
    # with late=serve (the order must push long prompts back too); docs/ALGORITHM.md
    prefill_work_weight: float | None = None
    # with late=relegate|reject: Moore-Hodgson over the waiting prompts each
    # step: whenever one would finish past its deadline at the prefill rate the decodes
    # leave, the longest so far is admitted only after the others (a queue-aware version
    # of the shared late test, which the other policies do not have: docs/RESULTS.md
    # reports FairBatching with and without it)
    set_aside: bool = True
    # --- fairbatching: the step budget's corrections (step_budget.py)
    # once more than kv_pressure_usage of the KV blocks are in use, steps
    # last at most kv_pressure_budget x the tightest pace (1: off), so decodes finish and
    # free blocks sooner than preemption would (docs/ALGORITHM.md)
    kv_pressure_usage: float = 0.9
    kv_pressure_budget: float = 0.6
    # fairbatching and qoserve: weight of each step's measured / predicted time in the
    # moving average that shortens the time budget while steps overrun the model (0: off)
    step_overrun_gain: float = 0.05

    # === research knobs: measured, kept off or at a default nobody needs to change ==========
    # (docs/ALGORITHM.md); per policy like the ones above, except late_deadline_factor (shared)
    # every policy: relegated prompts compete again once they have waited this many times
    # their TTFT (inf: only when no prompt that can still make its TTFT is waiting; rows 7-8)
    late_deadline_factor: float = float("inf")
    # fairbatching, qoserve: relegated decodes get a token at least every this many TPOTs
    # (1 or 1.5 measured: no effect)
    failed_decode_gap: float = 4.0
    # sarathi: cached context assumed by its recipe's probe step
    chunk_recipe_context: int = 1024
    # fairbatching: T = max(min slack, min tpot), or "min-slack": T = min slack (measured worse)
    time_budget_rule: TimeBudgetRule = "max-slack-tpot"
    # fairbatching: decodes ahead of their deadline may skip a step to make room for
    # prefill (the paper's mechanism). Off: measured to cost capacity
    defer_decodes: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError, naming the field, on a value no policy can run with."""
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"scheduler option {name} must be {what}, got {getattr(self, name)!r}")

        for name in ("max_num_batched_tokens", "max_num_seqs", "min_chunk", "chunk_align", "qoserve_max_step_tokens"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(_is_int(self.max_model_len) and self.max_model_len >= 2, "max_model_len",
             "an integer >= 2 (a prompt token and an output token)")
        for name in ("chunk_recipe_context", "qoserve_min_step_tokens"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.chunk_size is None or (_is_int(self.chunk_size) and self.chunk_size >= 1), "chunk_size",
             "None or an integer >= 1")
        for name in ("ttft_slo", "tpot_slo", "late_deadline_factor", "failed_decode_gap"):
            need(_is_num(getattr(self, name)) and getattr(self, name) > 0, name, "a number > 0")
        need(self.chunk_recipe_tpot is None or (_is_num(self.chunk_recipe_tpot) and self.chunk_recipe_tpot > 0),
             "chunk_recipe_tpot", "None or a number > 0")
        Late.parse(self.late)
        need(_is_num(self.ttft_margin) and self.ttft_margin >= 0, "ttft_margin", "a number >= 0")
        need(self.ttft_margin_quantile is None or (_is_num(self.ttft_margin_quantile)
                                                   and 0 < self.ttft_margin_quantile < 1),
             "ttft_margin_quantile", "None or in (0, 1)")
        need(_is_num(self.tpot_margin) and 0 <= self.tpot_margin < 1, "tpot_margin", "in [0, 1)")
        need(_is_num(self.qoserve_safety_factor) and self.qoserve_safety_factor >= 1, "qoserve_safety_factor",
             "a number >= 1")
        need(_is_num(self.qoserve_priority_weight) and self.qoserve_priority_weight >= 0, "qoserve_priority_weight",
             "a number >= 0")
        need(self.qoserve_min_step_tokens <= self.qoserve_max_step_tokens, "qoserve_min_step_tokens",
             f"<= qoserve_max_step_tokens ({self.qoserve_max_step_tokens})")
        need(_is_num(self.time_budget_min) and 0 < self.time_budget_min < math.inf, "time_budget_min",
             "a number of seconds > 0")
        need(_is_num(self.time_budget_max) and self.time_budget_min <= self.time_budget_max < math.inf,
             "time_budget_max", f"finite and >= time_budget_min ({self.time_budget_min})")
        need(self.time_budget_rule in TIME_BUDGET_RULES, "time_budget_rule", f"one of {', '.join(TIME_BUDGET_RULES)}")
        need(self.prefill_work_weight is None or (_is_num(self.prefill_work_weight) and self.prefill_work_weight >= 0),
             "prefill_work_weight", "None or a number >= 0")
        for name in ("defer_decodes", "set_aside"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        for name in ("kv_pressure_usage", "kv_pressure_budget"):
            need(_is_num(getattr(self, name)) and 0 < getattr(self, name) <= 1, name, "in (0, 1]")
        need(_is_num(self.step_overrun_gain) and 0 <= self.step_overrun_gain <= 1, "step_overrun_gain", "in [0, 1]")


# SchedulerConfig fields every policy reads (the base Scheduler, or its hosts for it); any
# policy takes them. Every other field is read by the policies whose ``reads`` names it.
SHARED_OPTIONS: frozenset[str] = frozenset({
    "max_num_batched_tokens", "max_num_seqs", "max_model_len", "ttft_slo", "tpot_slo", "late",
    "ttft_margin", "ttft_margin_quantile", "late_deadline_factor"})
OPTIONS: frozenset[str] = frozenset(f.name for f in fields(SchedulerConfig))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    """A real number, not NaN (JSON and the CLI give ints for whole numbers)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
