"""`fairbatch simulate`: policies x rates (or capacity search) on a trace, in parallel
processes, with a table, a JSON report and plots."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fairbatch.metrics import summary_table
from fairbatch.scheduler.variant import parse_variant
from fairbatch.sim.experiment import Scenario, capacities, prepare, prepare_json, run_policy

# The fair comparison (docs/RESULTS.md): every policy with the same late-request handling
# (SchedulerConfig.late), the token-budget baselines at the best budget of a sweep on the
# bundled conversation trace at the default SLOs and latency profile
# (`fairbatch tune -p sarathi` / `-p vllm`, 2026-11-30: 1,024 tokens for both).
DEFAULT_POLICIES = ("vllm:max_num_batched_tokens=1024", "sarathi:chunk_size=1024", "qoserve", "fairbatching")
# Near the best baseline's capacity on each bundled trace at the default SLOs (llama-3-8b,
# measured H100 profile), so the default run is informative.
DEFAULT_RATE_SCALE = {"azure-conv": 3.6, "azure-code": 1.2}
SWEEP = (0.8, 1.0, 1.2)   # rate multipliers of the default attainment-vs-rate sweep


@dataclass(frozen=True)
class Job:
    scenario: str          # JSON of the Scenario (hashable, cheap to send)
    policy: str            # a policy or a variant ("sarathi:chunk_size=1536")
    rate_scale: float | None   # None: capacity search
    targets: tuple[float, ...] = (0.9, 0.99)




def _run(job: Job) -> dict[str, Any]:
    """Runs in a worker process: returns only what the report needs (no Request objects)."""
    prep = prepare_json(job.scenario)
    if job.rate_scale is None:
        caps = capacities(prep, job.policy, targets=job.targets, lo=1.0)
        return {"policy": job.policy, "capacity": {str(t): c.to_dict() for t, c in caps.items()}}
    r = run_policy(prep, job.policy, job.rate_scale)
    ttft = [q.first_token_time - q.arrival for q in r.outcome.requests if q.first_token_time is not None]
    return {"policy": job.policy, "row": r.row(), "ttft": ttft}


def run_simulate(sc: Scenario, policies: list[str], rate_scale: float | None, *, search_capacity: bool,
                 sweep: bool, targets: tuple[float, ...], jobs: int, out: Path | None, json_path: Path | None,
                 console: Console) -> dict[str, Any]:
    prep = prepare(sc)   # validates everything up front, in this process
    if rate_scale is None:
        rate_scale = DEFAULT_RATE_SCALE.get(sc.trace, 1.0) if sc.trace in DEFAULT_RATE_SCALE else 1.0
    sc_json = json.dumps(sc.to_dict(), sort_keys=True)
    scales = [round(rate_scale * m, 4) for m in SWEEP] if sweep else [rate_scale]
    job_list = [Job(sc_json, p, s) for s in scales for p in policies]
    if search_capacity:
        job_list += [Job(sc_json, p, None, targets) for p in policies]

    console.print(f"[bold]{sc.trace}[/]: {len(prep.entries)} requests at {prep.base_rate:.2f} req/s "
                  f"(x{rate_scale} = {prep.base_rate * rate_scale:.2f} req/s), {sc.model} on {sc.gpu} "
                  f"({prep.latency.kind} latency model, {prep.num_blocks} KV blocks), "
                  f"{sc.instances} instance(s), SLO {describe_slos(sc)}, late={prep.config.late} for every policy")
    results: list[dict[str, Any]] = []
    workers = max(1, min(jobs, len(job_list)))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("simulating", total=len(job_list))
        if workers == 1:
            for j in job_list:
                results.append(_run(j))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for res in pool.map(_run, job_list):
                    results.append(res)
                    bar.advance(task)

    runs = [r["row"] for r in results if "row" in r]
    caps = {r["policy"]: r["capacity"] for r in results if "capacity" in r}
    main_rows = [row for row in runs if row["rate_scale"] == rate_scale]
    shown = [{**row, "policy": parse_variant(row["policy"]).short_label} for row in main_rows]
    console.print(summary_table(shown, title=f"rate scale x{rate_scale}"))
    for row in main_rows:
        if "prefix_cache_hit_rate" in row:
            console.print(f"  {row['policy']:>13s}: prefix cache hit rate {row['prefix_cache_hit_rate']:.1%} "
                          "(prompt tokens reused at first admission)")
        if "per_class" in row:
            for name, cls in row["per_class"].items():
                console.print(f"  {row['policy']:>13s} / {name}: SLO attainment {cls['slo_attainment']:.1%}, "
                              f"p99 TTFT {cls['p99_ttft_ms']:.0f} ms, p99 TPOT {cls['p99_tpot_ms']:.1f} ms")
    if caps:
        console.print("[bold]capacity[/] (highest rate with SLO attainment >= the target, every request counted):")
        for p in policies:
            parts = [f"{caps[p][str(t)]['request_rate']:.2f} req/s at {t:.0%} ({caps[p][str(t)]['status']})"
                     for t in targets]
            console.print(f"  {p}: " + ", ".join(parts))

    report: dict[str, Any] = {"scenario": sc.to_dict(), "runs": runs}
    if caps:
        report["capacity"] = {p: {str(t): caps[p][str(t)]["request_rate"] for t in targets} for p in policies}
        report["capacity_search"] = caps
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"wrote {json_path}")
    if out is not None:
        _write_outputs(out, report, results, policies, rate_scale, sc, targets, console)
    return report


def describe_slos(sc: Scenario) -> str:
    if sc.slo_classes:
        return f"classes {sc.slo_classes}"
    if sc.slo_by_tag:
        return f"by trace tag {sc.slo_by_tag}"
    return f"TTFT {sc.ttft_slo:g}s / TPOT {sc.tpot_slo * 1e3:g}ms"


def _write_outputs(out: Path, report: dict, results: list[dict], policies: list[str], rate_scale: float,
                   sc: Scenario, targets: tuple[float, ...], console: Console) -> None:
    from fairbatch.metrics import plot_attainment_vs_rate, plot_ttft_cdf

    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(report, indent=1) + "\n")
    ttfts = {r["policy"]: r["ttft"] for r in results if "row" in r and r["row"]["rate_scale"] == rate_scale}
    rate = next((r["row"]["request_rate"] for r in results if "row" in r and r["row"]["rate_scale"] == rate_scale), 0)
    written = [plot_ttft_cdf(ttfts, out / "ttft_cdf.png", f"TTFT CDF, {sc.trace} at {rate:.2f} req/s",
                             slo=sc.ttft_slo if not (sc.slo_classes or sc.slo_by_tag) else None)]
    target = min(targets)
    curves: dict[str, list[tuple[float, float]]] = {p: [] for p in policies}
    for r in results:
        if "row" in r:
            curves[r["policy"]].append((r["row"]["request_rate"], r["row"]["slo_attainment"]))
        else:
            for pt in r["capacity"][str(target)]["points"]:
                curves[r["policy"]].append((pt["request_rate"], pt["summary"]["slo_attainment"]))
    curves = {p: sorted(set(v)) for p, v in curves.items()}
    if any(len(v) > 1 for v in curves.values()):
        written.append(plot_attainment_vs_rate(curves, out / "attainment_vs_rate.png", target,
                                               f"SLO attainment vs rate, {sc.trace}"))
    console.print("wrote " + ", ".join(str(p) for p in [out / "simulate.json", *written]))


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))
