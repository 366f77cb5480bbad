"""Choosing a step-time model: an explicit profile, else a shipped measured profile for the
model x GPU pair (``profiles/{model}_{gpu}.json``), else the analytic roofline."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from fairbatch.latency.base import LatencyModel
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.latency.roofline import RooflineLatencyModel
from fairbatch.specs import get_gpu, get_model

_KINDS: dict[str, Any] = {"linear": LinearLatencyModel, "roofline": RooflineLatencyModel}


def latency_model_from_dict(data: Any) -> LatencyModel:
    """Rebuild a model from its ``to_dict()`` form, dispatching on ``"kind"``."""
    if not isinstance(data, dict):
        raise ValueError(f"a latency profile must be a JSON object, got {type(data).__name__}")
    cls = _KINDS.get(data.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown latency model kind {data.get('kind')!r}; choose from {', '.join(_KINDS)}")
    return cls.from_dict(data)


def _load_text(text: str, where: str) -> LatencyModel:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"latency profile {where} is not valid JSON: {e}") from None
    try:
        return latency_model_from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"latency profile {where} is malformed: {e}") from None


def load_profile(path: str | Path) -> LatencyModel:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValueError(f"latency profile not found: {p}") from None
    return _load_text(text, str(p))


def shipped_profile(model: str, gpu: str) -> resources.abc.Traversable | None:
    """The measured profile bundled for ``model`` on ``gpu``, if there is one."""
    f = resources.files("fairbatch.latency").joinpath("profiles", f"{model}_{gpu}.json")
    return f if f.is_file() else None


def load_latency_model(model: str = "llama-3-8b", gpu: str = "h100",
                       profile: str | Path | None = None) -> LatencyModel:
    """``profile`` if given (its model/GPU names are then not checked), else the shipped
    measured profile for ``model`` x ``gpu``, else a roofline of the presets."""
    if profile is not None:
        return load_profile(profile)
    shipped = shipped_profile(model, gpu)
    if shipped is not None:
        return _load_text(shipped.read_text(), f"{model}_{gpu}.json (shipped)")
    return RooflineLatencyModel(get_model(model), get_gpu(gpu))
