"""A policy with settings of its own: ``"sarathi:chunk_size=1536"``.

Comparisons run each baseline at its best (a swept budget) next to its default, so a
run names a policy *variant*: the registered policy plus the SchedulerConfig fields it
overrides. Values are parsed as JSON where they can be (``late=relegate`` stays a string).
A variant sets only options its policy reads (``Scheduler.reads``, or a shared one):
``sarathi:time_budget_min=0.02`` is an error, as that would be silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fairbatch.scheduler.base import OPTIONS, SchedulerConfig, check_policy_options, policy_names, policy_options

_BUDGETS = ("chunk_size", "max_num_batched_tokens")   # the token budget of each baseline


@dataclass(frozen=True)
class PolicyVariant:
    name: str                              # the registered policy
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.overrides)

    @property
    def short_label(self) -> str:
        """For narrow tables: a token budget shows as its value (``sarathi:1024``)."""
        parts = [str(v) if k in _BUDGETS else f"{k}={v}" for k, v in self.overrides]
        return self.name + (":" + ",".join(parts) if parts else "")

    def config(self, base: SchedulerConfig) -> SchedulerConfig:
        """``base`` with this variant's fields set (``replace`` validates them)."""
        return replace(base, **dict(self.overrides))


def parse_variant(spec: str) -> PolicyVariant:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``; unknown policies and fields, and fields
    the policy does not read, are errors."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in policy_names():
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(policy_names())}")
    overrides: list[tuple[str, Any]] = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in OPTIONS:
            raise ValueError(f"bad policy setting {item!r} in {spec!r}: expected KEY=VALUE with KEY an "
                             f"option {name} reads ({', '.join(sorted(policy_options(name)))})")
        try:
            overrides.append((key, json.loads(value)))
        except json.JSONDecodeError:
            overrides.append((key, value.strip()))
    try:
        check_policy_options(name, (k for k, _ in overrides))
    except ValueError as e:
        raise ValueError(f"{e} (in {spec!r})") from None
    return PolicyVariant(name, tuple(overrides))
