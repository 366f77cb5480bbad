"""Scheduling policies. ``make_scheduler(name, ...)`` builds one by its registered name."""

from fairbatch.scheduler.base import (
    Load,
    Scheduler,
    SchedulerConfig,
    make_scheduler,
    policy_names,
    register_policy,
)

__all__ = ["Load", "Scheduler", "SchedulerConfig", "make_scheduler", "policy_names", "register_policy"]
