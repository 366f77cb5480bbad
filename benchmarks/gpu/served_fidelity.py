"""Simulator fidelity: the served runs of `serve_bench_device.py` (real engine on the GPU,
`fairbatch bench` over HTTP) next to the simulator's prediction for the same requests,
rate scale, policy and KV-cache size. Prints a Markdown table (and the simulator's
capacity for the same request count) to paste into docs/RESULTS.md.

    PYTHONPATH=src python benchmarks/gpu/served_fidelity.py docs/results/served_h100/summary_vllm.json \\
        docs/results/served_h100/summary_sarathi_fairbatching_a.json ... --num-blocks 27374
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from fairbatch.cli import parse_options
from fairbatch.sim.executor import NoisySimExecutor
from fairbatch.sim.experiment import Scenario, capacity, prepare, run_policy

POLICY_ORDER = {"vllm": 0, "sarathi": 1, "qoserve": 2, "fairbatching": 3}


def variant_of(policy: str, serve_args: list[str]) -> str:
    """The simulator's policy variant for a server started with ``serve_args``
    (``--set KEY=VALUE`` pairs; others do not change the schedule). A cell's own serve
    flags (``fairbatching@--async-scheduling``) are engine options: the simulator runs
    the policy without them."""
    policy = policy.partition("@")[0]
    sets = [serve_args[i + 1] for i, a in enumerate(serve_args[:-1]) if a == "--set"]
    if not sets:
        return policy
    return policy + ("," if ":" in policy else ":") + ",".join(sets)   # (policy may be a variant already)


def rel(sim: float, real: float) -> str:
    return f"{(real - sim) / sim:+.0%}" if sim else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", type=Path)
    ap.add_argument("--trace", default="azure-conv", help="the trace the served runs replayed")
    ap.add_argument("--num-blocks", type=int, help="KV blocks of the served engine (its start-up line)")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--router", default="admission")
    ap.add_argument("--capacity", action="store_true", help="also the simulator's capacity per policy")
    ap.add_argument("--profile", type=Path, help="step-time profile for the simulator (e.g. a served host's "
                    "GET /profile, as serve_bench_device.py saves it); default: the shipped one")
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="scheduler option for the simulator, as the served runs had it (e.g. tpot_margin=0.1, "
                         "`fairbatch serve`'s default since 2026-11-22)")
    ap.add_argument("--served-offset", default="0",
                    help="seconds the served stack adds to each TTFT, judged by the simulator (Scenario.served_offset); "
                         "'measured': each run's own served_offset_ms (client minus engine mean TTFT), where recorded")
    ap.add_argument("--policy-profile", action="append", default=[], metavar="POLICY=PATH",
                    help="this policy's rows on this profile instead of --profile (each policy on "
                         "the refit of the server that ran it: the refits differ by policy)")
    ap.add_argument("--step-noise", type=float, default=0.0, metavar="SIGMA",
                    help="steps take the model's time x a log-normal factor of this standard deviation "
                         "(NoisySimExecutor; the GPU's cycles vary around the refit)")
    ap.add_argument("--step-noise-rho", type=float, default=0.98, help="its step-to-step correlation")
    ap.add_argument("--seeds", type=int, default=1, help="with --step-noise: simulator runs per cell, averaged")
    ap.add_argument("--served-offset-cv", type=float, default=0.0,
                    help="spread of that delay across requests (Scenario.served_offset_cv; 1: exponential)")
    args = ap.parse_args()
    rows = []
    caching = set()     # the served engines' prefix caching, which the simulator copies
    for path in args.summaries:
        d = json.loads(path.read_text())
        caching.add("--no-prefix-caching" not in d.get("serve_args", []))
        for r in d.get("rows", []):
            if "result" in r:
                # cluster_bench_device.py names the policy once, in its arguments
                r.setdefault("policy", d.get("args", {}).get("policy"))
                r["variant"] = variant_of(r["policy"], d.get("serve_args", []))
                rows.append(r)
    rows.sort(key=lambda r: (POLICY_ORDER.get(r["policy"], 9), r["variant"], r["scale"]))
    num = {r["result"]["completed"] + r["result"].get("failed", 0) for r in rows}
    if len(num) != 1:
        raise SystemExit(f"runs of different sizes: {sorted(num)}")
    n = num.pop()
    if len(caching) != 1:
        raise SystemExit("runs with and without prefix caching: compare them in two calls")
    sc = Scenario(trace=args.trace, num_requests=n, instances=args.instances, router=args.router,
                  profile=str(args.profile) if args.profile else None, scheduler=parse_options(args.options),
                  prefix_caching=caching.pop())
    prep = prepare(sc)
    if args.num_blocks:
        prep = replace(prep, num_blocks=args.num_blocks)
    preps = {}   # variant -> its own Prepared (--policy-profile)
    for spec in args.policy_profile:
        policy, sep, path = spec.rpartition("=")    # the policy may carry settings (name:key=value)
        if not sep:
            raise SystemExit(f"--policy-profile wants POLICY=PATH, got {spec!r}")
        own = prepare(replace(sc, profile=path))
        preps[policy] = replace(own, num_blocks=args.num_blocks) if args.num_blocks else own
    print(f"{n} requests of {args.trace}, llama-3-8b, KV blocks {prep.num_blocks}, step-time profile "
          f"{args.profile or 'shipped'}" + "".join(f", {p}" for p in args.policy_profile)
          + (f", step noise {args.step_noise:g} (rho {args.step_noise_rho:g}, {args.seeds} seeds)" if args.step_noise else "")
          + f", options {sc.scheduler or 'none'}; each cell: simulator / real (difference)\n")
    print("| policy | scale | rate req/s | served offset ms | SLO att. | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
          "| goodput req/s | step time real / model |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        real = r["result"]
        offset = (r.get("engine", {}).get("served_offset_ms", 0.0) / 1e3 if args.served_offset == "measured"
                  else float(args.served_offset))
        base = preps.get(r["policy"], preps.get(r["variant"], prep))
        sc_run = replace(base.scenario, served_offset=offset, served_offset_cv=args.served_offset_cv)
        sim = simulate_cell(replace(base, scenario=sc_run), r["variant"], r["scale"], args)
        cells = []
        for key, fmt in (("slo_attainment", ".3f"), ("median_ttft_ms", ".0f"), ("p99_ttft_ms", ".0f"),
                         ("median_tpot_ms", ".1f"), ("p99_tpot_ms", ".1f"), ("request_goodput", ".2f")):
            if sim.get(key) is None or real.get(key) is None:   # goodput: only when the bench was given an SLO
                cells.append("n/a")
                continue
            s, x = float(sim[key]), float(real[key])
            diff = "" if key == "slo_attainment" else f" ({rel(s, x)})"
            cells.append(f"{s:{fmt}} / {x:{fmt}}{diff}")
        eng = r.get("engine", {}).get("measured_over_predicted")
        tail = f" | {eng:.2f} |" if eng else " | n/a |"
        label = r["variant"] + (f" ({r['policy'].partition('@')[2]})" if "@" in r["policy"] else "")
        print(f"| {label} | {r['scale']:g} | {real['request_rate']:.2f} | {1e3 * offset:.0f} | "
              + " | ".join(cells) + tail)
    if args.capacity:
        print()
        for policy in sorted({r["variant"] for r in rows}, key=lambda p: POLICY_ORDER.get(p.split(":")[0], 9)):
            c = capacity(prep, policy, lo=2.0, rel_tol=0.02)
            print(f"simulator capacity {policy}: scale {c.rate_scale:.3f} = {c.request_rate:.2f} req/s ({c.status})")


def simulate_cell(prep, policy: str, scale: float, args) -> dict:
    """The simulator's summary for one served cell: exact steps, or with --step-noise the
    mean over --seeds runs of noisy steps (numbers averaged; what is not a number, from
    the first run)."""
    if not args.step_noise:
        return run_policy(prep, policy, scale).summary
    runs = []
    for seed in range(args.seeds):
        def noisy(model, k, seed=seed):   # noqa: ANN001, ANN202
            return NoisySimExecutor(model, args.step_noise, args.step_noise_rho, seed=1000 * seed + k)
        runs.append(run_policy(prep, policy, scale, make_executor=noisy).summary)
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
                isinstance(r.get(key), (int, float)) for r in runs):
            out[key] = sum(r[key] for r in runs) / len(runs)
    return out


if __name__ == "__main__":
    main()
