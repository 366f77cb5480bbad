"""Capacity (90 % and 99 % SLO attainment) of policy variants on one cell of the fair
matrix: the quick experiments behind docs/ALGORITHM.md's "fair fight" rows and the
QoServe weight sweep in docs/RESULTS.md. Same settings and start scale as
benchmarks/sim/fair_matrix.py.

    python benchmarks/sim/variant_capacity.py "azure-code|default|fairbatching:set_aside=false" \\
        "azure-conv|loose|qoserve:qoserve_priority_weight=0.016,late=serve" [--jobs 2]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fairbatch.sim.experiment import Scenario, capacities, prepare

sys.path.insert(0, str(Path(__file__).parent))
from fair_matrix import SLO_SETTINGS, START  # noqa: E402


def one(spec: str) -> str:
    trace, slo, variant = spec.split("|")
    c = capacities(prepare(Scenario(trace=trace, **SLO_SETTINGS[slo])), variant, lo=START[trace])
    return f"{trace:10s} {slo:8s} {variant:60s} {c[0.9].request_rate:7.2f} {c[0.99].request_rate:7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+", help="TRACE|SLO|VARIANT (SLO: default, tight, loose, mixed)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    print(f"{'trace':10s} {'slo':8s} {'variant':60s} {'at 90%':>7s} {'at 99%':>7s}  (req/s)")
    with ProcessPoolExecutor(args.jobs) as pool:
        for line in pool.map(one, args.cells):
            print(line, flush=True)


if __name__ == "__main__":
    main()
