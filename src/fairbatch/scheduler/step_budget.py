"""FairBatching's time budget: how long the next step may take (QoServe shares the two
corrections below, so both policies are equally equipped against a step-time model that
is off and against KV pressure).

``T = max(min slack, min pace)`` over the running decodes (a step shorter than one token
interval buys little and costs a whole weight read), clamped to ``[time_budget_min,
time_budget_max]``, ``time_budget_max`` when nothing decodes; then two corrections:

- **KV pressure**: with more than ``kv_pressure_usage`` of the blocks in use, at most
  ``kv_pressure_budget`` x the tightest pace, so running requests finish and free their
  blocks sooner instead of being preempted and recomputed.
- **Overrun**: steps fill the budget exactly, so a stretch of steps slower than the model
  makes paced requests late; the budget is divided by a moving average of measured over
  predicted step time while that is above 1 (a simulator whose steps take exactly the
  model's time never moves it).
"""

from __future__ import annotations

from fairbatch.kv import BlockAllocator


class StepBudget:
    __slots__ = ("config", "allocator", "overrun")

    def __init__(self, config, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.overrun = 1.0      # recent measured / predicted step time (moving average)

    def observe(self, predicted: float | None, measured: float) -> None:
        """A step the model predicted to take ``predicted`` seconds took ``measured``."""
        g = self.config.step_overrun_gain
        if g and predicted and predicted > 0.0 and measured > 0.0:
            self.overrun += g * (measured / predicted - self.overrun)

    def seconds(self, min_slack: float | None, min_pace: float) -> float:
        """The budget, given the least slack and the tightest pace of the running decodes
        (``min_slack`` None: nothing decodes)."""
        cfg = self.config
        if min_slack is None:
            T = cfg.time_budget_max
        else:
            T = min_slack
            if cfg.time_budget_rule == "max-slack-tpot" and min_pace > T:
                T = min_pace
            T = min(max(self.under_pressure(T, min_pace), cfg.time_budget_min), cfg.time_budget_max)
        return self.after_overrun(T)

    def under_pressure(self, T: float, min_pace: float) -> float:
        """``T``, capped at ``kv_pressure_budget`` x the tightest pace while the KV cache is
        fuller than ``kv_pressure_usage``."""
        cfg, a = self.config, self.allocator
        if a.num_free < (1.0 - cfg.kv_pressure_usage) * a.num_blocks:   # read here: QoServe never asks
            return min(T, cfg.kv_pressure_budget * min_pace)
        return T

    def after_overrun(self, T: float) -> float:
        """``T`` shortened by the recent overrun of measured over predicted step time."""
        return T / self.overrun if self.overrun > 1.0 else T
