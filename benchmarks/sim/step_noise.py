"""How each policy copes with steps that deviate from its step-time model: capacity in the
simulator when every step takes the model's time times a slowly varying factor
(``NoisySimExecutor``: log-normal, standard deviation --sigma, step-to-step correlation
--rho), the model itself right on average. FairBatching fills each step up to its tightest
deadline, so a stretch of slow steps makes its paced requests late; ``tpot_margin`` paces
them inside the SLO to leave room for that. Policies are given as NAME or
NAME:tpot_margin=VALUE.

    PYTHONPATH=src python benchmarks/sim/step_noise.py --profile docs/results/served_h100/capacity/profile_served_h100.json \\
        --num 800 --num-blocks 27374 --sigma 0.05 --rho 0.98 \\
        --policy vllm --policy sarathi --policy fairbatching --policy fairbatching:tpot_margin=0.1
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from fairbatch.cli import parse_options
from fairbatch.metrics import find_capacity
from fairbatch.sim.executor import NoisySimExecutor
from fairbatch.sim.experiment import Scenario, prepare, run_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", action="append", required=True, help="NAME or NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--profile", help="step-time profile (default: the shipped one)")
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--num", type=int, default=800)
    ap.add_argument("--num-blocks", type=int)
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--rho", type=float, default=0.98)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = prepare(Scenario(trace=args.trace, num_requests=args.num, profile=args.profile))
    if args.num_blocks:
        base = replace(base, num_blocks=args.num_blocks)
    print(f"{args.num} requests of {args.trace}; capacity (SLO attainment >= 0.9) by step-time deviation "
          f"(rho {args.rho})\n")
    print("| policy | " + " | ".join(f"sigma {s:g}" for s in args.sigma) + " |")
    print("|---|" + "---|" * len(args.sigma))
    for spec in args.policy:
        name, _, opts = spec.partition(":")
        prep = replace(base, config=replace(base.config, **parse_options(opts.split(",") if opts else [])))
        cells = []
        for sigma in args.sigma:
            def noisy(model, k, sigma=sigma):   # noqa: ANN001, ANN202
                return NoisySimExecutor(model, sigma, args.rho, seed=args.seed + k)
            c = find_capacity(lambda s: run_policy(prep, name, s, make_executor=noisy).summary,  # noqa: B023
                              lo=2.0, target=0.9, rel_tol=0.02)
            cells.append(f"{c.rate_scale:.3f}")
        print(f"| {spec} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
