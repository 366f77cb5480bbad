"""Capacity of each policy on the bundled traces, at several SLO settings, in the simulator.
Writes the JSON of every capacity search, attainment-vs-rate plots, and a markdown table
(the source of docs/RESULTS.md).

    python benchmarks/capacity_matrix.py --out docs/results [--jobs 2] [--trace azure-conv ...]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fairbatch.sim.experiment import Scenario, capacity, prepare

SLO_SETTINGS: dict[str, dict[str, Any]] = {
    "default (TTFT 1 s, TPOT 50 ms)": {"ttft_slo": 1.0, "tpot_slo": 0.05},
    "tight (TTFT 0.5 s, TPOT 30 ms)": {"ttft_slo": 0.5, "tpot_slo": 0.03},
    "loose (TTFT 3 s, TPOT 100 ms)": {"ttft_slo": 3.0, "tpot_slo": 0.1},
    "mixed (30% 0.5 s/30 ms, 70% 5 s/150 ms)": {"slo_classes": "interactive:0.5:0.03:0.3,batch:5:0.15:0.7"},
}
POLICIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # label: (policy, scheduler options, scenario options)
    "vllm": ("vllm", {}, {}),
    "sarathi": ("sarathi", {}, {}),
    "fairbatching": ("fairbatching", {}, {}),
}
ABLATIONS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "fairbatching, no triage": ("fairbatching", {"triage": False}, {}),
    "fairbatching, envelope deadlines": ("fairbatching", {}, {"deadline_rule": "envelope"}),
}


def one(job: tuple[str, str, str, dict, dict, dict]) -> dict[str, Any]:
    trace, slo_label, label, slo_opts, sched_opts, sc_opts = job
    policy = POLICIES.get(label, ABLATIONS.get(label))[0]   # type: ignore[index]
    sc = Scenario(trace=trace, scheduler=sched_opts, **slo_opts, **sc_opts)
    t0 = time.perf_counter()
    res = capacity(prepare(sc), policy, lo=1.0 if trace == "azure-conv" else 2.0)
    return {"trace": trace, "slo": slo_label, "label": label, "policy": policy, "scenario": sc.to_dict(),
            "wall_s": time.perf_counter() - t0, **res.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--trace", action="append")
    ap.add_argument("--no-ablations", action="store_true")
    args = ap.parse_args()
    traces = args.trace or ["azure-conv", "azure-code"]
    jobs = []
    for trace in traces:
        for slo_label, slo_opts in SLO_SETTINGS.items():
            labels = dict(POLICIES)
            if not args.no_ablations and slo_label.startswith("default"):
                labels.update(ABLATIONS)
            for label, (_, sched_opts, sc_opts) in labels.items():
                jobs.append((trace, slo_label, label, slo_opts, sched_opts, sc_opts))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        for f in as_completed(futures):
            r = f.result()
            results.append(r)
            print(f"{r['trace']:11s} {r['slo']:42s} {r['label']:34s} {r['request_rate']:7.2f} req/s "
                  f"({r['status']}, {r['wall_s']:.0f} s)", flush=True)
            (args.out / "capacity_matrix.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table_and_plots(results, args.out)


def write_table_and_plots(results: list[dict[str, Any]], out: Path) -> None:
    from fairbatch.metrics import plot_attainment_vs_rate

    lines = []
    for trace in dict.fromkeys(r["trace"] for r in results):
        lines += [f"### {trace}", "", "| SLO | policy | capacity req/s | vs sarathi | SLO att. at capacity "
                  "| envelope att. at capacity | p99 TTFT ms at capacity |", "|---|---|---|---|---|---|---|"]
        for slo in dict.fromkeys(r["slo"] for r in results if r["trace"] == trace):
            group = [r for r in results if r["trace"] == trace and r["slo"] == slo]
            base = next((r["request_rate"] for r in group if r["label"] == "sarathi"), None)
            order = list(POLICIES) + list(ABLATIONS)
            for r in sorted(group, key=lambda r: order.index(r["label"])):
                at = next((p["summary"] for p in r["points"] if p["rate_scale"] == r["rate_scale"]), {})
                rel = f"{r['request_rate'] / base:.2f}x" if base else "-"
                lines.append(f"| {slo} | {r['label']} | {r['request_rate']:.2f} | {rel} | "
                             f"{at.get('slo_attainment', float('nan')):.3f} | "
                             f"{at.get('envelope_attainment', float('nan')):.3f} | {at.get('p99_ttft_ms', float('nan')):.0f} |")
            curves = {r["label"]: sorted((p["request_rate"], p["slo_attainment"]) for p in r["points"]) for r in group}
            env = {r["label"]: sorted((p["request_rate"], p["summary"]["envelope_attainment"]) for p in r["points"])
                   for r in group}
            slug = f"{trace}_{slo.split()[0]}"
            plot_attainment_vs_rate(curves, out / f"attainment_{slug}.png", 0.9, f"{trace}, {slo} SLOs")
            plot_attainment_vs_rate(env, out / f"envelope_{slug}.png", 0.9, f"{trace}, {slo} SLOs",
                                    ylabel="envelope attainment")
        lines.append("")
    (out / "capacity_matrix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
