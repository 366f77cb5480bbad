"""Configuration of the vLLM plugin: defaults, config file, environment, vLLM's
``--additional-config``, and the per-request SLO override. No vLLM import here.

Precedence, lowest first: built-in defaults < the file named by ``FAIRBATCH_VLLM_CONFIG``
(JSON, or TOML when it ends in ``.toml``) < ``FAIRBATCH_*`` environment variables <
``--additional-config '{"fairbatch": {...}}'`` given to vLLM. Every source uses the same
keys (``PluginConfig`` fields, plus any ``SchedulerConfig`` field of our policies),
converted to the field's type by pydantic (which vLLM depends on). Once the policy is
known (the last source may name it, or the scheduler class force it), a scheduler option
that policy does not read is an error (``check_policy_options``).

A request overrides its SLO through vLLM's ``SamplingParams.extra_args`` (in the
OpenAI API: ``"vllm_xargs": {...}`` in the request body) with ``ttft_slo`` /
``tpot_slo`` in seconds (or ``ttft_slo_ms`` / ``tpot_slo_ms``) and/or ``slo_class``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

from pydantic import TypeAdapter, ValidationError

from fairbatch.request import SLO, DeadlineRule
from fairbatch.scheduler.base import SchedulerConfig, check_policy_options

log = logging.getLogger("fairbatch.integrations.vllm")

ENV_PREFIX = "FAIRBATCH_"
CONFIG_FILE_ENV = "FAIRBATCH_VLLM_CONFIG"

# SchedulerConfig fields the plugin takes from vLLM itself, never from our config.
_FROM_VLLM = frozenset({"max_num_batched_tokens", "max_num_seqs", "max_model_len"})
_SCHED_TYPES = get_type_hints(SchedulerConfig)   # field -> type


@dataclass
class PluginConfig:
    """Everything the plugin needs besides what vLLM's own config gives it."""

    policy: str = "fairbatching"
    ttft_slo: float = 1.0                  # default SLO, seconds
    tpot_slo: float = 0.05
    slo_classes: dict[str, SLO] = field(default_factory=dict)   # name -> SLO
    deadline_rule: str = DeadlineRule.TPOT_SAFE.value
    # step-time model: a profile file, else presets (roofline), else one derived from the
    # served model's config and the detected GPU, else a placeholder; refitted online.
    latency_profile: str | None = None
    model_preset: str | None = None
    gpu_preset: str | None = None
    refit: bool = True
    refit_every: int = 50                  # steps between refits
    refit_window: int = 2000               # most recent steps a refit uses
    refit_min_samples: int = 40
    # load estimate for routers: GET http://load_host:load_port/load (off when None)
    load_port: int | None = None
    load_host: str = "127.0.0.1"
    # overrides of fairbatch.scheduler.SchedulerConfig fields (time_budget_max, chunk_size, ...)
    scheduler: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (self.ttft_slo > 0 and self.tpot_slo > 0 and math.isfinite(self.ttft_slo)
                and math.isfinite(self.tpot_slo)):
            raise ValueError(f"fairbatch: ttft_slo and tpot_slo must be positive seconds, got "
                             f"ttft_slo={self.ttft_slo} tpot_slo={self.tpot_slo}")
        DeadlineRule(self.deadline_rule)   # raises on an unknown rule
        for name in ("refit_every", "refit_window", "refit_min_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"fairbatch: {name} must be >= 1, got {getattr(self, name)}")
        if self.load_port is not None and not (0 <= self.load_port < 65536):
            raise ValueError(f"fairbatch: load_port must be 0..65535, got {self.load_port}")
        for key in self.scheduler:
            if key not in _SCHED_TYPES or key in _FROM_VLLM:
                allowed = sorted(set(_SCHED_TYPES) - _FROM_VLLM - {"ttft_slo", "tpot_slo"})
                raise ValueError(f"fairbatch: unknown scheduler option {key!r}; choose from "
                                 f"{', '.join(allowed)} (max_num_batched_tokens, max_num_seqs and "
                                 f"max_model_len come from vLLM's own flags)")
        if self.scheduler.get("late") == "reject":
            # refusing needs vLLM to finish the request with an error from inside the
            # scheduler; not built: late requests are relegated or served instead
            raise ValueError("fairbatch: late=reject is not supported inside vLLM; use relegate or serve")

    @property
    def default_slo(self) -> SLO:
        return SLO(self.ttft_slo, self.tpot_slo, "default")

    def scheduler_config(self, *, max_num_batched_tokens: int, max_num_seqs: int,
                         max_model_len: int) -> SchedulerConfig:
        """The policy's config; ValueError on an option ``self.policy`` does not read
        (checked here, not per source: a later source may change the policy)."""
        try:
            check_policy_options(self.policy, self.scheduler)
        except ValueError as e:
            raise ValueError(f"fairbatch: {e}") from None
        return SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                               max_model_len=max_model_len, **{**self.scheduler, "ttft_slo": self.ttft_slo,
                                                               "tpot_slo": self.tpot_slo})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["slo_classes"] = {n: {"ttft": s.ttft, "tpot": s.tpot} for n, s in self.slo_classes.items()}
        return d


# --- parsing -------------------------------------------------------------------------------

def parse_slo_classes(value: Any) -> dict[str, SLO]:
    """``"name:TTFT_s:TPOT_s[:share],..."`` (the workload module's format, share optional
    and ignored here), or a mapping ``{name: {"ttft": s, "tpot": s}}``."""
    if isinstance(value, Mapping):
        out: dict[str, SLO] = {}
        for name, v in value.items():
            try:
                out[str(name)] = SLO(float(v["ttft"]), float(v["tpot"]), str(name))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"fairbatch: SLO class {name!r} needs positive 'ttft' and 'tpot' "
                                 f"seconds: {e}") from None
        return out
    if not isinstance(value, str):
        raise ValueError(f"fairbatch: slo_classes must be a string or a mapping, got {type(value).__name__}")  # noqa: TRY004
    from fairbatch.workload.slo_classes import parse_slo_classes as parse_mix

    items = [i.strip() for i in value.split(",") if i.strip()]
    spec = ",".join(i if i.count(":") >= 3 else i + ":1" for i in items)
    try:
        return {c.name: c.slo() for c in parse_mix(spec)}
    except ValueError as e:
        raise ValueError(f"fairbatch: bad slo_classes {value!r}: {e}") from None


_PLUGIN_TYPES = get_type_hints(PluginConfig)


def _typed(name: str, value: Any, annotation: Any) -> Any:
    """``value`` (a JSON or TOML value, or an environment string) as ``annotation``, by
    pydantic's lax rules ("32" is 32, "off" is False, 5.5 is no int); "" and "none" are
    None where None is allowed."""
    if isinstance(value, str) and value.strip().lower() in ("", "none") and type(None) in get_args(annotation):
        return None
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as e:
        raise ValueError(f"fairbatch: option {name}={value!r}: {e.errors()[0]['msg']}") from None


def _typed_plugin_value(key: str, value: Any) -> Any:
    if key == "slo_classes":
        return parse_slo_classes(value)
    if key == "scheduler":
        if not isinstance(value, Mapping):
            raise ValueError("fairbatch: 'scheduler' must be a mapping of SchedulerConfig fields")
        return {k: _typed_sched_value(k, v) for k, v in value.items()}
    return _typed(key, value, _PLUGIN_TYPES[key])


def _typed_sched_value(key: str, value: Any) -> Any:
    if key not in _SCHED_TYPES:
        return value   # validate() names it
    return _typed(key, value, _SCHED_TYPES[key])


def _merge(cfg: PluginConfig, data: Mapping[str, Any], where: str) -> PluginConfig:
    """Apply ``data`` (PluginConfig keys; SchedulerConfig keys go to ``scheduler``)."""
    updates: dict[str, Any] = {}
    sched = dict(cfg.scheduler)
    for key, value in data.items():
        if key in _PLUGIN_TYPES:
            v = _typed_plugin_value(key, value)
            if key == "scheduler":
                sched.update(v)
            elif key == "slo_classes":
                updates[key] = {**cfg.slo_classes, **v}
            else:
                updates[key] = v
        elif key in _SCHED_TYPES:
            sched[key] = _typed_sched_value(key, value)
        else:
            raise ValueError(f"fairbatch: unknown option {key!r} in {where}; known: "
                             f"{', '.join(sorted(set(_PLUGIN_TYPES) | (set(_SCHED_TYPES) - _FROM_VLLM)))}")
    updates["scheduler"] = sched
    try:
        return replace(cfg, **updates)
    except ValueError as e:
        raise ValueError(f"{e} (from {where})") from None


def _read_file(path: str) -> Mapping[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"fairbatch: cannot read config file {p} ({CONFIG_FILE_ENV}): {e}") from None
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"fairbatch: config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"fairbatch: config file {p} must hold an object")  # noqa: TRY004
    inner = data.get("fairbatch", data)
    if not isinstance(inner, Mapping):
        raise ValueError(f"fairbatch: 'fairbatch' in config file {p} must be an object")  # noqa: TRY004
    return inner


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FAIRBATCH_<KEY>`` for every PluginConfig and SchedulerConfig key (upper case)."""
    out: dict[str, Any] = {}
    keys = (set(_PLUGIN_TYPES) - {"scheduler"}) | (set(_SCHED_TYPES) - _FROM_VLLM)
    for key in keys:
        v = environ.get(ENV_PREFIX + key.upper())
        if v is not None:
            out[key] = v
    return out


def load_plugin_config(additional_config: Mapping[str, Any] | None = None,
                       environ: Mapping[str, str] | None = None,
                       base: PluginConfig | None = None) -> PluginConfig:
    """Defaults < config file < environment < vLLM's ``--additional-config`` ``fairbatch`` key."""
    env = os.environ if environ is None else environ
    cfg = base or PluginConfig()
    path = env.get(CONFIG_FILE_ENV)
    if path:
        cfg = _merge(cfg, _read_file(path), f"config file {path}")
    ov = env_overrides(env)
    if ov:
        cfg = _merge(cfg, ov, "environment (FAIRBATCH_*)")
    extra = (additional_config or {}).get("fairbatch") if isinstance(additional_config, Mapping) else None
    if extra:
        if not isinstance(extra, Mapping):
            raise ValueError("fairbatch: --additional-config's 'fairbatch' must be an object")
        cfg = _merge(cfg, extra, "--additional-config")
    return cfg


# --- per-request SLO -----------------------------------------------------------------------

def _positive(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def request_slo(extra_args: Mapping[str, Any] | None, cfg: PluginConfig) -> SLO:
    """The SLO of one request: its ``slo_class`` (if known), then its explicit
    ``ttft_slo``/``tpot_slo`` (seconds) or ``*_ms`` values on top, else the default.
    A bad value is ignored with a warning: a request never fails over its SLO hint."""
    slo = cfg.default_slo
    if not extra_args:
        return slo
    name = extra_args.get("slo_class")
    if name is not None:
        cls = cfg.slo_classes.get(str(name))
        if cls is None:
            log.warning("fairbatch: unknown slo_class %r (known: %s); using the default SLO",
                        name, ", ".join(sorted(cfg.slo_classes)) or "none")
        else:
            slo = cls
    ttft, tpot = slo.ttft, slo.tpot
    changed = False
    for key, scale in (("ttft_slo", 1.0), ("ttft_slo_ms", 1e-3), ("tpot_slo", 1.0), ("tpot_slo_ms", 1e-3)):
        if key in extra_args:
            v = _positive(extra_args[key])
            if v is None:
                log.warning("fairbatch: ignoring %s=%r (needs a positive number)", key, extra_args[key])
                continue
            if key.startswith("ttft"):
                ttft = v * scale
            else:
                tpot = v * scale
            changed = True
    if changed:
        return SLO(ttft, tpot, slo.name if slo.name != "default" else "custom")
    return slo
