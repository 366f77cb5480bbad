"""The simulator's prediction for a served call before it runs (CPU): SLO attainment per
policy at each load of `serve_bench_device.py`'s grid, modelled as `served_fidelity.py`
models finished runs (each policy on its own server's refitted step-time profile, the
served stack's delay, log-normal step noise), so a GPU call can be checked against a
number written down beforehand.

    PYTHONPATH=src python benchmarks/gpu/predict_served.py --trace azure-code --num 800 \
        --scales 1.2 1.35 1.5 1.65 1.8 --num-blocks 27850 --served-offset 0.010 \
        --policy-profile qoserve=docs/results/fair_conv_h100_rounds/profile_qoserve.json \
        --policy-profile fairbatching:ttft_margin_quantile=0.9=docs/results/fair_conv_h100_rounds/profile_fairbatching_ttft_margin_quantile_0.9.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from served_fidelity import simulate_cell  # noqa: E402

from fairbatch.cli import parse_options  # noqa: E402
from fairbatch.sim.experiment import Scenario, prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--num", type=int, default=1500)
    ap.add_argument("--scales", type=float, nargs="+", required=True)
    ap.add_argument("--policy-profile", action="append", required=True, metavar="POLICY=PATH",
                    help="a policy (with settings) and the profile its server refitted")
    ap.add_argument("--num-blocks", type=int, help="KV blocks of the served engine")
    ap.add_argument("--set", dest="options", action="append", default=["tpot_margin=0.1", "ttft_margin=0.1"],
                    metavar="KEY=VALUE", help="scheduler option (default: the served defaults)")
    ap.add_argument("--served-offset", type=float, default=0.010, help="seconds the served stack adds to TTFT")
    ap.add_argument("--served-offset-cv", type=float, default=1.0)
    ap.add_argument("--step-noise", type=float, default=0.1)
    ap.add_argument("--step-noise-rho", type=float, default=0.98)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.num} requests of {args.trace}, served offset {1e3 * args.served_offset:.0f} ms "
          f"(cv {args.served_offset_cv:g}), step noise {args.step_noise:g}, {args.seeds} seeds; SLO attainment\n")
    print("| policy | " + " | ".join(f"x{s:g}" for s in args.scales) + " |")
    print("|---|" + "---|" * len(args.scales))
    for spec in args.policy_profile:
        policy, sep, path = spec.rpartition("=")
        if not sep:
            raise SystemExit(f"--policy-profile wants POLICY=PATH, got {spec!r}")
        sc = Scenario(trace=args.trace, num_requests=args.num, profile=path, scheduler=parse_options(args.options),
                      served_offset=args.served_offset, served_offset_cv=args.served_offset_cv)
        prep = prepare(sc)
        if args.num_blocks:
            prep = replace(prep, num_blocks=args.num_blocks)
        att = [simulate_cell(prep, policy, s, args)["slo_attainment"] for s in args.scales]
        print(f"| {policy} | " + " | ".join(f"{a:.3f}" for a in att) + " |", flush=True)


if __name__ == "__main__":
    main()
