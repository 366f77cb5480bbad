"""Every policy at the same load: the rate at which the best baseline of each cell of the
fair matrix (fair_matrix.json) reaches its capacity at 90 % attainment. Shows what a
capacity number hides: the tails of served requests at equal load, and what relegation or
rejection costs the requests it gives up on.

    python benchmarks/sim/same_load.py --matrix docs/results/fair_matrix.json --out docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fairbatch.sim.experiment import Scenario, prepare, run_policy

sys.path.insert(0, str(Path(__file__).parent))
from fair_matrix import SLO_SETTINGS, rows_of  # noqa: E402

KEYS = ("slo_attainment", "ttft_attainment", "tpot_attainment", "median_ttft_ms", "p99_ttft_ms", "p99_tpot_ms",
        "p99_e2el_ms", "request_goodput", "rejected", "relegated")


def one(job: tuple[dict[str, Any], str, float]) -> dict[str, Any]:
    sc_dict, variant, scale = job
    sc = Scenario(**sc_dict)
    r = run_policy(prepare(sc), variant, scale)
    ttft = [q.first_token_time - q.arrival for q in r.outcome.requests if q.first_token_time is not None]
    return {"trace": sc.trace, "variant": variant, "rate_scale": scale, **{k: r.summary[k] for k in KEYS},
            "request_rate": r.summary["request_rate"], "ttft": ttft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=Path, default=Path("docs/results/fair_matrix.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--slo", action="append", help="SLO settings (default: default)")
    args = ap.parse_args()
    matrix = json.loads(args.matrix.read_text())
    jobs, meta = [], []
    for cell in dict.fromkeys((r["trace"], r["slo"], r["late"]) for r in matrix):
        trace, slo, late = cell
        if slo not in (args.slo or ["default"]):
            continue
        rows = rows_of([r for r in matrix if (r["trace"], r["slo"], r["late"]) == cell])
        baselines = [r90 for label, r90, _ in rows if not label.startswith("fairbatching")
                     and "default budget" not in label and "recipe" not in label]
        best = max(baselines, key=lambda r: r["0.9"]["request_rate"])
        scale = best["0.9"]["rate_scale"]
        sc = {"trace": trace, "scheduler": {"late": late}, **SLO_SETTINGS[slo]}
        for label, r90, _ in rows:
            if "default budget" in label or "recipe" in label:
                continue
            jobs.append((sc, r90["variant"], scale))
            meta.append({"slo": slo, "late": late, "label": label})
    with ProcessPoolExecutor(args.jobs) as pool:
        out = [dict(m, **r) for m, r in zip(meta, pool.map(one, jobs))]
    from fairbatch.metrics import plot_ttft_cdf

    lines = ["| trace | late | rate req/s | policy | SLO att. | TTFT p50 / p99 ms (served) | TPOT p99 ms "
             "| E2E p99 ms | goodput req/s | rejected | relegated |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        lines.append(f"| {r['trace']} | {r['late']} | {r['request_rate']:.2f} | {r['label']} ({r['variant']}) | "
                     f"{r['slo_attainment']:.3f} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
                     f"{r['p99_tpot_ms']:.1f} | {r['p99_e2el_ms']:.0f} | {r['request_goodput']:.2f} | "
                     f"{r['rejected']} | {r['relegated']} |")
    for key in dict.fromkeys((r["trace"], r["slo"], r["late"]) for r in out):
        group = [r for r in out if (r["trace"], r["slo"], r["late"]) == key]
        plot_ttft_cdf({r["label"]: r["ttft"] for r in group}, args.out / f"ttft_cdf_{key[0]}_{key[1]}_{key[2]}.png",
                      f"TTFT, {key[0]}, {key[1]} SLOs, late={key[2]}, {group[0]['request_rate']:.2f} req/s")
    for r in out:
        del r["ttft"]
    (args.out / "same_load.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "same_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
