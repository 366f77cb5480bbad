"""Cluster-scale simulation speed and memory: N requests (default 1M) over M instances
(default 64), lengths sampled from the bundled conversation trace, Poisson arrivals, one
policy, each router. Targets (issue 18): < 5 min on one core, < 4 GB peak for 1M / 64.

    python benchmarks/sim/sim_scale.py [--requests 1000000] [--instances 64] [--rate-per-instance 14]
                                   [--router R ...] [--policy fairbatching] [--jobs N]
    python benchmarks/sim/sim_scale.py --trace multi-turn [--no-prefix-caching] ...

A trace whose entries name their prompt blocks (``hash_ids``: ``mooncake``,
``multi-turn``) is not sampled: resampling its requests would send turns without the turns
they extend, and re-send the same prompt many times. Its requests are replayed in the
trace's order instead, tiled to N: copy ``c`` of the trace has its block names offset so
that copies share nothing with each other (``sim.split.TiledBlockNames``; the names are
built as each request is made, so memory stays bounded), with Poisson arrivals at the
total rate as for other traces, and prefix caching on (``--no-prefix-caching``: the same
requests without it). At that rate a session's turns come closer together than in the
trace (as any rate scaling does). The line adds the prefix-cache hit rate. Mooncake's
prompts need a longer context than the default scenario's 8,192 tokens (longer prompts
are cut to it), e.g. ``--model qwen2.5-7b --max-model-len 32768``. Traces without
``hash_ids`` run exactly as before.

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
EXTRA_ROUTERS = ("prefix",)      # by name only: reads block names (a trace with hash_ids)


def workload(n: int, instances: int, rate_per_instance: float, trace: str, seed: int, model: str | None = None,
             max_model_len: int | None = None, prefix_caching: bool = True):
    """Lengths drawn (with replacement) from the trace, Poisson arrivals at the total rate;
    a trace with block names: its requests in order, tiled to ``n``, each copy's names apart."""
    from fairbatch.request import SLO
    from fairbatch.sim.experiment import Scenario, prepare
    from fairbatch.sim.split import TiledBlockNames, Workload

    sc = Scenario(trace=trace, max_model_len=max_model_len, prefix_caching=prefix_caching)
    if model is not None:
        sc.model = model
    prep = prepare(sc)      # lengths already fit the context
    rng = np.random.default_rng(seed)
    if any(e.hash_ids is not None for e in prep.entries):
        m = len(prep.entries)
        entry = np.arange(n, dtype=np.int64) % m
        prompt = np.fromiter((e.prompt_len for e in prep.entries), np.int32, m)[entry]
        output = np.fromiter((e.output_len for e in prep.entries), np.int32, m)[entry]
        arrival = np.cumsum(rng.exponential(1.0 / (rate_per_instance * instances), n))
        names = None
        if prep.block_hashes is not None:     # (prefix caching on)
            offset = (np.arange(n, dtype=np.int64) // m) * TiledBlockNames.stride(prep.block_hashes)
            names = TiledBlockNames(prep.block_hashes, entry, offset)
        sc = prep.scenario
        return prep, Workload(arrival, prompt, output, SLO(sc.ttft_slo, sc.tpot_slo), block_hashes=names)
    prompt = np.fromiter((e.prompt_len for e in prep.entries), np.int32, len(prep.entries))
    output = np.fromiter((e.output_len for e in prep.entries), np.int32, len(prep.entries))
    pick = rng.integers(0, len(prompt), n)
    arrival = np.cumsum(rng.exponential(1.0 / (rate_per_instance * instances), n))
    sc = prep.scenario
    return prep, Workload(arrival, prompt[pick], output[pick], SLO(sc.ttft_slo, sc.tpot_slo))


def run_one(args: argparse.Namespace, router: str) -> dict:
    from fairbatch.sim.split import Cluster, run_cluster, split_reason

    t0 = time.perf_counter()
    prep, work = workload(args.requests, args.instances, args.rate_per_instance, args.trace, args.seed,
                          args.model, args.max_model_len, args.prefix_caching)
    t_prep = time.perf_counter() - t0
    cluster = Cluster(args.policy, prep.config, prep.num_blocks, prep.latency, router, args.load_interval,
                      prefix_caching=work.block_hashes is not None)
    c0 = time.process_time()
    res = run_cluster(cluster, work, args.instances, jobs=args.jobs)
    t_sum = time.perf_counter()
    s = res.summary.summary()
    t_sum = time.perf_counter() - t_sum
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    hits = {} if work.block_hashes is None else {
        "prefix_cache_hit_rate": round(res.prefix_hits / res.prefix_queries, 4) if res.prefix_queries else 0.0}
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
        **hits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--rate-per-instance", type=float, default=14.0,
                    help="req/s per instance (default 14: 896 req/s over 64, issue 18's load)")
    ap.add_argument("--router", action="append", choices=ROUTERS + EXTRA_ROUTERS,
                    help=f"default: {', '.join(ROUTERS)}")
    ap.add_argument("--policy", default="fairbatching")
    ap.add_argument("--load-interval", type=float, default=0.0)
    ap.add_argument("--trace", default="azure-conv",
                    help="lengths are sampled from it; a trace with hash_ids (mooncake, multi-turn) is replayed "
                         "in order, tiled, with prefix caching (see above)")
    ap.add_argument("--model", help="the scenario's model (default: the simulator's, llama-3-8b)")
    ap.add_argument("--max-model-len", type=int, help="context (default: the model's, at most 8192)")
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                    help="for a trace with hash_ids: reuse cached prefixes (default on, as the simulator)")
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
              + (f" hit rate {row['prefix_cache_hit_rate']:.4f}" if "prefix_cache_hit_rate" in row else "")
              + (" (one process: load-aware router)" if row["not_split"] else ""))
        print("  " + json.dumps(row))


if __name__ == "__main__":
    main()
