"""Cluster-scale simulation speed and memory: N requests (default 1M) over M instances
(default 64), lengths sampled from the bundled conversation trace, Poisson arrivals, one
policy, each router. Targets (issue 18): < 5 min on one core, < 4 GB peak for 1M / 64.

    python benchmarks/sim/sim_scale.py [--requests 1000000] [--instances 64] [--rate-per-instance 14]
                                   [--router R ...] [--policy fairbatching] [--jobs N]

Each router runs in a fresh process, so its peak memory (max RSS, the number
``/usr/bin/time -v`` reports) is its own. ``--jobs N`` splits a run over N processes where
the router allows it exactly (``round_robin``: decisions depend on arrival order only);
load-aware routers always run in one process (``fairbatch.sim.split.split_reason``), and
the line says so. Peak memory with jobs is that of the largest process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROUTERS = ("round_robin", "least_requests", "llumnix", "admission")


def workload(n: int, instances: int, rate_per_instance: float, trace: str, seed: int):
    """Lengths drawn (with replacement) from the trace, Poisson arrivals at the total rate."""
    from fairbatch.request import SLO
    from fairbatch.sim.experiment import Scenario, prepare
    from fairbatch.sim.split import Workload

    prep = prepare(Scenario(trace=trace))      # lengths already fit the context
    rng = np.random.default_rng(seed)
    prompt = np.fromiter((e.prompt_len for e in prep.entries), np.int32, len(prep.entries))
    output = np.fromiter((e.output_len for e in prep.entries), np.int32, len(prep.entries))
    pick = rng.integers(0, len(prompt), n)
    arrival = np.cumsum(rng.exponential(1.0 / (rate_per_instance * instances), n))
    sc = prep.scenario
    return prep, Workload(arrival, prompt[pick], output[pick], SLO(sc.ttft_slo, sc.tpot_slo))


def run_one(args: argparse.Namespace, router: str) -> dict:
    from fairbatch.sim.split import Cluster, run_cluster, split_reason

    t0 = time.perf_counter()
    prep, work = workload(args.requests, args.instances, args.rate_per_instance, args.trace, args.seed)
    t_prep = time.perf_counter() - t0
    cluster = Cluster(args.policy, prep.config, prep.num_blocks, prep.latency, router, args.load_interval)
    c0 = time.process_time()
    res = run_cluster(cluster, work, args.instances, jobs=args.jobs)
    t_sum = time.perf_counter()
    s = res.summary.summary()
    t_sum = time.perf_counter() - t_sum
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {
        "router": router, "requests": len(work), "instances": args.instances, "jobs": res.jobs,
        "not_split": split_reason(router) if args.jobs > 1 else None,
        "prepare_s": round(t_prep, 2), "sim_wall_s": round(res.wall_time, 1),
        "sim_cpu_s_this_process": round(time.process_time() - c0, 1), "summary_s": round(t_sum, 2),
        "us_per_request": round(1e6 * res.wall_time / max(len(work), 1), 1),
        "peak_rss_gib": round(max(self_rss, child_rss), 2),
        "simulated_s": round(res.end_time, 1), "steps": sum(res.steps), "preemptions": res.preemptions,
        "unfinished": res.unfinished, "output_tokens": s["total_output_tokens"],
        "slo_attainment": round(s["slo_attainment"], 4), "p99_ttft_ms": round(s["p99_ttft_ms"], 1),
        "p99_itl_ms": round(s["p99_itl_ms"], 2), "itl_sketched": "itl_relative_accuracy" in s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--rate-per-instance", type=float, default=14.0,
                    help="req/s per instance (default 14: 896 req/s over 64, issue 18's load)")
    ap.add_argument("--router", action="append", choices=ROUTERS, help="default: every router")
    ap.add_argument("--policy", default="fairbatching")
    ap.add_argument("--load-interval", type=float, default=0.0)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1,
                    help="split the instances over N processes; exact, and used, only for routers that "
                         "read no load (round_robin: decisions depend on arrival order alone). "
                         "least_requests, llumnix and admission read every instance's state at each "
                         "arrival, so they cannot be split exactly and run in one process")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child: one router, JSON out
    args = ap.parse_args()
    routers = args.router or list(ROUTERS)
    if args.one:
        print(json.dumps(run_one(args, routers[0])))
        return
    print(f"{args.requests:,} requests over {args.instances} instances at "
          f"{args.rate_per_instance * args.instances:g} req/s, {args.policy}, jobs {args.jobs}; "
          f"python {platform.python_version()} on {platform.machine()}")
    print(f"{'router':15s} {'wall s':>7s} {'us/req':>7s} {'peak GiB':>8s} {'jobs':>4s} {'steps':>10s} "
          f"{'SLO att':>8s} {'p99 ITL':>8s}")
    for r in routers:
        cmd = [sys.executable, __file__, "--one", "--router", r] + [
            a for a in sys.argv[1:] if a not in routers and a != "--router"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{r}: failed\n{out.stderr}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r:15s} {row['sim_wall_s']:7.1f} {row['us_per_request']:7.1f} {row['peak_rss_gib']:8.2f} "
              f"{row['jobs']:4d} {row['steps']:10d} {row['slo_attainment']:8.4f} {row['p99_itl_ms']:8.2f}"
              + (" (one process: load-aware router)" if row["not_split"] else ""))
        print("  " + json.dumps(row))


if __name__ == "__main__":
    main()
