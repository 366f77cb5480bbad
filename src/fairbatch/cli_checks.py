"""Option checks the command line runs before any work: each bad value is one usage error
from click (exit status 2), naming the option, instead of a traceback or a failure after a
long run. Typer's ``min``/``max`` cover closed ranges; these callbacks cover the rest
(open bounds, paths that must not be directories, lists of fractions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def positive(value: float | None) -> float | None:
    """> 0 (None passes: the option was not given)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value:g}")
    return value


def non_negative(value: float | None) -> float | None:
    if value is not None and not value >= 0:
        raise typer.BadParameter(f"must be >= 0, got {value:g}")
    return value


def fractions(values: list[float] | None) -> list[float] | None:
    """SLO attainment targets: each in (0, 1]."""
    for v in values or ():
        if not 0 < v <= 1:
            raise typer.BadParameter(f"must be in (0, 1] (a fraction of requests), got {v:g}")
    return values


def output_file(path: Path | None) -> Path | None:
    """A file to write at the end of a run: refused now if it is a directory or its folder
    is missing, not after the run."""
    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory; give a file name")
    if not path.parent.exists():
        raise typer.BadParameter(f"folder {path.parent} does not exist")
    return path


def profile_mismatch(profile: Path, model: str, gpu: str) -> str | None:
    """Why ``profile`` may not fit ``--model`` / ``--gpu`` (its ``meta`` names others), or None."""
    try:
        meta = json.loads(profile.read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return None                      # unreadable: loading it reports that
    said: dict[str, Any] = {"model": model, "gpu": gpu}
    off = [f"{k} {meta[k]!s} (--{k} {v})" for k, v in said.items() if isinstance(meta.get(k), str) and meta[k] != v]
    if not off:
        return None
    return f"profile {profile} was measured for {', '.join(off)}: its step times are used as they are"


__all__ = ["fractions", "non_negative", "output_file", "positive", "profile_mismatch"]
