"""A backend's ``Load`` as the HTTP router knows it: parsed from the backend's
``GET /load`` JSON, or an empty one for a backend that is idle or cannot say."""

from __future__ import annotations

import math
from typing import Any, Mapping

from fairbatch.scheduler.base import Load

_INF = float("inf")
_LOAD_FIELDS = ("running", "waiting", "kv_usage", "free_blocks", "num_blocks", "queued_prefill_tokens",
                "admission_budget", "time")


def load_from_json(obj: Mapping[str, Any], *, time: float = 0.0) -> Load:
    """A ``Load`` from a backend's ``GET /load`` JSON (``time`` is set to the caller's clock:
    a backend's own clock means nothing to the router). Raises ValueError if a field is
    missing or not a number."""
    vals: dict[str, Any] = {}
    for f in _LOAD_FIELDS[:-1]:
        v = obj.get(f)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"/load answer lacks a numeric {f!r}")
        vals[f] = v
    for f in ("running", "waiting", "free_blocks", "num_blocks", "queued_prefill_tokens"):
        vals[f] = int(vals[f])
    vals["kv_usage"] = float(vals["kv_usage"])
    b = float(vals["admission_budget"])
    vals["admission_budget"] = b if not math.isnan(b) else -_INF
    return Load(**vals, time=time)


def empty_load(time: float = 0.0, *, budget: float = _INF) -> Load:
    """The load of an instance known to be idle, or of one that cannot say (a backend
    without ``/load``): the router's own sent-since-poll counts then carry the policy."""
    return Load(running=0, waiting=0, kv_usage=0.0, free_blocks=0, num_blocks=0, queued_prefill_tokens=0,
                admission_budget=budget, time=time)
