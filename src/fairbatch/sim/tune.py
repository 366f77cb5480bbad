"""`fairbatch tune`: a baseline's budget swept over a grid, capacity at each value.

A comparison against a baseline whose budget was set by a recipe measures the recipe.
This sweeps the knob that decides a token-budget policy's trade between prefill
throughput and TPOT (Sarathi-Serve's ``chunk_size``, vLLM's ``max_num_batched_tokens``)
for the given trace, SLOs and latency model, and reports the capacity at every value, so
that comparisons use the best.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fairbatch.sim.experiment import Scenario, capacities, prepare, prepare_json

# The budget knob of each token-budget policy, and the grid swept by default.
KNOBS: dict[str, str] = {"sarathi": "chunk_size", "vllm": "max_num_batched_tokens",
                         "vllm-priority": "max_num_batched_tokens"}
DEFAULT_GRID: dict[str, tuple[int, ...]] = {
    "chunk_size": (256, 512, 768, 1024, 1536, 2048, 3072, 4096),
    "max_num_batched_tokens": (512, 1024, 2048, 4096, 8192),
}


@dataclass(frozen=True)
class TunePoint:
    scenario: str          # JSON of the Scenario
    variant: str           # "sarathi:chunk_size=512,late=relegate"
    targets: tuple[float, ...]
    lo: float




def _run(p: TunePoint) -> dict[str, Any]:
    caps = capacities(prepare_json(p.scenario), p.variant, targets=p.targets, lo=p.lo)
    return {"variant": p.variant,
            "capacity": {str(t): {"rate_scale": c.rate_scale, "request_rate": c.request_rate, "status": c.status}
                         for t, c in caps.items()}}


def variant_label(policy: str, knob: str, value: int, extra: str = "") -> str:
    return f"{policy}:{knob}={value}" + (f",{extra}" if extra else "")


def tune(sc: Scenario, policy: str, *, grid: tuple[int, ...] | None = None, extra: str = "",
         targets: tuple[float, ...] = (0.9, 0.99), lo: float = 1.0, jobs: int = 1) -> dict[str, Any]:
    """Capacity of ``policy`` at every grid value of its budget knob; ``extra`` adds
    settings to every variant (``"late=relegate"``). Returns a JSON-ready report with the
    best value per target (ties: the smaller budget, which has the lower TPOT)."""
    if policy not in KNOBS:
        raise ValueError(f"nothing to tune for {policy!r}: tunable policies are {', '.join(KNOBS)}")
    knob = KNOBS[policy]
    values = tuple(grid or DEFAULT_GRID[knob])
    if not values or any(v < 16 for v in values):
        raise ValueError(f"grid values must be token counts >= 16, got {values}")
    prepare(sc)   # validate in this process
    sc_json = json.dumps(sc.to_dict(), sort_keys=True)
    points = [TunePoint(sc_json, variant_label(policy, knob, v, extra), targets, lo) for v in values]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(points))) as pool:
            rows = list(pool.map(_run, points))
    else:
        rows = [_run(p) for p in points]
    for v, row in zip(values, rows):
        row["value"] = v
    best = {}
    for t in targets:
        key = str(t)
        top = max(rows, key=lambda r: (r["capacity"][key]["request_rate"], -r["value"]))
        best[key] = {"value": top["value"], "variant": top["variant"], **top["capacity"][key]}
    return {"scenario": sc.to_dict(), "policy": policy, "knob": knob, "extra": extra,
            "targets": list(targets), "rows": rows, "best": best}


def print_tune(report: dict[str, Any], console: Console) -> None:
    targets = [str(t) for t in report["targets"]]
    table = Table(title=f"{report['policy']}: capacity (req/s) per {report['knob']}"
                        + (f" ({report['extra']})" if report["extra"] else ""))
    table.add_column(report["knob"], justify="right")
    for t in targets:
        table.add_column(f"at {float(t):.0%}", justify="right")
    for row in report["rows"]:
        cells = []
        for t in targets:
            c = row["capacity"][t]
            mark = "*" if report["best"][t]["value"] == row["value"] else ""
            cells.append(f"{c['request_rate']:.2f}{mark}")
        table.add_row(str(row["value"]), *cells)
    console.print(table)
    for t in targets:
        b = report["best"][t]
        console.print(f"best at {float(t):.0%}: {b['variant']} ({b['request_rate']:.2f} req/s)")


def write_tune(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
