"""Simulator speed: the full bundled Azure conversation trace (19,366 requests), one
instance, each policy, in one process. Target (docs/PERFORMANCE.md): < 10 s per policy on one core.

    python benchmarks/sim/sim_speed.py [--rate-scale 1.0] [--policy P ...] [--instances N]
"""

from __future__ import annotations

import argparse
import platform
import time

from fairbatch.sim.experiment import Scenario, prepare, run_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--policy", action="append")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--router", default="round_robin")
    args = ap.parse_args()
    policies = args.policy or ["vllm", "sarathi", "fairbatching"]
    t0 = time.perf_counter()
    prep = prepare(Scenario(trace=args.trace, instances=args.instances, router=args.router))
    print(f"prepare: {time.perf_counter() - t0:.2f} s; {len(prep.entries)} requests; "
          f"python {platform.python_version()} on {platform.processor() or platform.machine()}")
    print(f"{'policy':14s} {'rate x':>7s} {'wall s':>7s} {'cpu s':>7s} {'steps':>8s} {'tokens':>9s} {'sim s':>8s} {'SLO att':>8s}")
    for p in policies:
        r = run_policy(prep, p, args.rate_scale)
        o = r.outcome
        print(f"{p:14s} {args.rate_scale:7.2f} {o.wall_time:7.2f} {o.cpu_time:7.2f} {sum(o.steps):8d} "
              f"{r.summary['total_output_tokens']:9d} {o.end_time:8.0f} {r.summary['slo_attainment']:8.3f}")


if __name__ == "__main__":
    main()
