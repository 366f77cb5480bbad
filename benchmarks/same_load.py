"""Every policy at the same load: the rate at which Sarathi-Serve reaches its capacity
(read from capacity_matrix.json), for each trace and SLO setting of that matrix. Shows
what a capacity number hides: tails at equal load, and what triage costs the requests
it gives up on.

    python benchmarks/same_load.py --matrix docs/results/capacity_matrix.json --out docs/results
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fairbatch.sim.experiment import Scenario, prepare, run_policy

KEYS = ("slo_attainment", "envelope_attainment", "ttft_attainment", "tpot_attainment", "median_ttft_ms",
        "p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms", "request_goodput", "num_preemptions")


def one(job: tuple[dict[str, Any], str, float]) -> dict[str, Any]:
    sc_dict, policy, scale = job
    sc = Scenario(**sc_dict)
    r = run_policy(prepare(sc), policy, scale)
    ttft = [q.first_token_time - q.arrival for q in r.outcome.requests if q.first_token_time is not None]
    return {"trace": sc.trace, "policy": policy, "rate_scale": scale, **{k: r.summary[k] for k in KEYS},
            "request_rate": r.summary["request_rate"], "ttft": ttft, "scenario": sc_dict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--matrix", type=Path, default=Path("docs/results/capacity_matrix.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    matrix = json.loads(args.matrix.read_text())
    jobs, labels = [], []
    for r in matrix:
        if r["label"] != "sarathi":
            continue
        base = {k: v for k, v in r["scenario"].items() if k != "scheduler"}
        for policy in ("vllm", "sarathi", "fairbatching"):
            jobs.append(({**base, "scheduler": {}}, policy, r["rate_scale"]))
            labels.append(r["slo"])
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, jobs))
    for row, slo in zip(rows, labels):
        row["slo"] = slo
    from fairbatch.metrics import plot_ttft_cdf

    lines = ["| trace | SLO | rate req/s | policy | SLO att. | envelope att. | TTFT p50 / p99 ms | TPOT p99 ms "
             "| E2E p99 ms | goodput req/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['trace']} | {row['slo']} | {row['request_rate']:.2f} | {row['policy']} | "
                     f"{row['slo_attainment']:.3f} | {row['envelope_attainment']:.3f} | "
                     f"{row['median_ttft_ms']:.0f} / {row['p99_ttft_ms']:.0f} | {row['p99_tpot_ms']:.1f} | "
                     f"{row['p99_e2el_ms']:.0f} | {row['request_goodput']:.2f} |")
    for key in dict.fromkeys((r["trace"], r["slo"]) for r in rows):
        group = [r for r in rows if (r["trace"], r["slo"]) == key]
        plot_ttft_cdf({r["policy"]: r["ttft"] for r in group},
                      args.out / f"ttft_cdf_{key[0]}_{key[1].split()[0]}.png",
                      f"TTFT, {key[0]}, {key[1]} SLOs, {group[0]['request_rate']:.2f} req/s")
    for r in rows:
        del r["ttft"]
    (args.out / "same_load.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "same_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
