"""Per-cell means of served runs: every `summary_*.json` that `serve_bench_device.py`
wrote into a folder (named LABEL_summary_POLICY.json when collected from several calls),
grouped by (rate scale, label): each run's SLO attainment, then the mean of attainment,
TTFT / TPOT attainment, TTFT and TPOT p50 / p99 and relegated requests.

    python benchmarks/gpu/gpu_runs_table.py docs/results/fair_h200x2_conv
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    cells: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for f in sorted(args.folder.glob("*summary_*.json")):
        label = f.name.split("_summary_")[0] if "_summary_" in f.name else f.stem
        for row in json.loads(f.read_text())["rows"]:
            if "result" in row:
                cells[(row["scale"], label)].append(row["result"])

    def mean(xs: list[dict], key: str) -> float:
        return statistics.mean(x[key] for x in xs)

    print("| scale | label | runs | SLO attainment (mean) | TTFT / TPOT attainment | TTFT p50 / p99 ms "
          "| TPOT p50 / p99 ms | relegated |")
    print("|---|---|---|---|---|---|---|---|")
    for (scale, label), xs in sorted(cells.items()):
        att = ", ".join(f"{x['slo_attainment']:.3f}" for x in xs)
        print(f"| x{scale:g} | {label} | {len(xs)} | {att} ({mean(xs, 'slo_attainment'):.3f}) "
              f"| {mean(xs, 'ttft_attainment'):.3f} / {mean(xs, 'tpot_attainment'):.3f} "
              f"| {mean(xs, 'p50_ttft_ms'):.0f} / {mean(xs, 'p99_ttft_ms'):.0f} "
              f"| {mean(xs, 'p50_tpot_ms'):.1f} / {mean(xs, 'p99_tpot_ms'):.1f} | {mean(xs, 'relegated'):.0f} |")


if __name__ == "__main__":
    main()
