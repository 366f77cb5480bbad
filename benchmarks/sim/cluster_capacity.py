"""Simulated capacity of a cluster: N instances behind a router, for each scheduling policy
x routing policy, on the bundled Azure traces. Writes the JSON of every capacity search
and a markdown table (capacity, and the ratio to the best baseline behind least_requests).

    python benchmarks/sim/cluster_capacity.py --out docs/results [--jobs 16]
    python benchmarks/sim/cluster_capacity.py --instances 2 --num-requests 300 --out /tmp/cc   # a quick check

Loads reach the router ``--load-interval`` seconds stale (default 0.05 s, the HTTP
router's default poll interval); routers add what they sent since (see docs/CLUSTER.md).
``--ablations`` adds each load-reading router without that accounting (``:count_sent=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fairbatch.sim.experiment import Scenario, capacity, prepare

# Every policy with the same late-request handling (SchedulerConfig.late, default relegate);
# Sarathi at the best budget of `fairbatch tune` on each trace (1,024 conversation, 1,536 code).
POLICIES = ("sarathi:chunk_size=1024", "sarathi:chunk_size=1536", "qoserve", "fairbatching")
ROUTERS = ("least_requests", "admission")
REFERENCE_ROUTER = "least_requests"   # the reference: the best baseline policy behind it
# First rate scale tried, per instance: about half a single instance's capacity (docs/RESULTS.md),
# so the search doubles a couple of times, then bisects.
LO_PER_INSTANCE = {"azure-conv": 2.5, "azure-code": 0.8}


def one(job: dict[str, Any]) -> dict[str, Any]:
    sc = Scenario(trace=job["trace"], num_requests=job["num_requests"], instances=job["instances"],
                  router=job["router"], load_interval=job["load_interval"], ttft_slo=job["ttft_slo"],
                  tpot_slo=job["tpot_slo"], seed=job["seed"])
    t0 = time.perf_counter()
    c0 = time.process_time()
    prep = prepare(sc)
    lo = LO_PER_INSTANCE.get(job["trace"], 1.0) * job["instances"]
    res = capacity(prep, job["policy"], lo=lo, rel_tol=job["rel_tol"])
    out = res.to_dict()
    for p in out["points"]:         # keep the JSON small: the summary keys the table reads
        s = p["summary"]
        p["summary"] = {k: s.get(k) for k in ("slo_attainment", "envelope_attainment", "p99_ttft_ms", "p99_tpot_ms",
                                               "mean_ttft_ms", "requests_per_instance", "num_preemptions",
                                               "completed", "failed")}
    return {**job, "scenario": sc.to_dict(), "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    ap.add_argument("--trace", action="append", help="azure-conv, azure-code (repeatable; default both)")
    ap.add_argument("--instances", type=int, action="append", help="cluster sizes (repeatable; default 4 and 16)")
    ap.add_argument("--policy", action="append", help=f"default: {', '.join(POLICIES)}")
    ap.add_argument("--router", action="append", help=f"default: {', '.join(ROUTERS)}")
    ap.add_argument("--ablations", action="store_true", help="also each load-reading router with count_sent=false")
    ap.add_argument("--num-requests", type=int, default=None, help="first N requests of each trace (default: all)")
    ap.add_argument("--load-interval", type=float, default=0.05, help="staleness of the router's loads, seconds")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.05)
    ap.add_argument("--rel-tol", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    traces = args.trace or ["azure-conv", "azure-code"]
    sizes = args.instances or [4, 16]
    policies = args.policy or list(POLICIES)
    routers = list(args.router or ROUTERS)
    if args.ablations:
        routers += [f"{r}:count_sent=false" for r in routers if r != "round_robin" and ":" not in r]
    for t in traces:            # validate once, here, with a clear message
        prepare(Scenario(trace=t, num_requests=min(args.num_requests or 10, 10), instances=2, router=routers[0]))
    jobs = [{"trace": t, "instances": n, "policy": p, "router": r, "num_requests": args.num_requests,
             "load_interval": args.load_interval, "ttft_slo": args.ttft_slo, "tpot_slo": args.tpot_slo,
             "rel_tol": args.rel_tol, "seed": args.seed}
            for t in traces for n in sizes for p in policies for r in routers]
    # biggest first: the long searches start early, the pool drains evenly
    jobs.sort(key=lambda j: -j["instances"])
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "cluster_capacity.json"
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    print(f"{len(jobs)} capacity searches on {args.jobs} processes", flush=True)
    with ProcessPoolExecutor(max(1, min(args.jobs, len(jobs)))) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        for f in as_completed(futures):
            r = f.result()
            results.append(r)
            print(f"[{time.perf_counter() - t0:6.0f} s] {r['trace']:10s} x{r['instances']:<3d} {r['policy']:13s} "
                  f"{r['router']:32s} {r['request_rate']:8.2f} req/s ({r['status']}, {r['wall_s']:.0f} s)", flush=True)
            json_path.write_text(json.dumps(sorted(results, key=_order), indent=1) + "\n")
    results.sort(key=_order)
    text = table(results)
    (args.out / "cluster_capacity.md").write_text(text)
    print(text)
    print(f"wrote {json_path} and {args.out / 'cluster_capacity.md'} in {time.perf_counter() - t0:.0f} s")


def _order(r: dict[str, Any]) -> tuple:
    pol = list(POLICIES).index(r["policy"]) if r["policy"] in POLICIES else 99
    base = r["router"].split(":")[0]
    rt = list(ROUTERS).index(base) if base in ROUTERS else 99
    return (r["trace"], r["instances"], pol, rt, r["router"])


def _at_capacity(r: dict[str, Any]) -> dict[str, Any]:
    return next((p["summary"] for p in r["points"] if p["rate_scale"] == r["rate_scale"]), {})


def table(results: list[dict[str, Any]]) -> str:
    """Per trace x cluster size: capacity (req/s) of each policy x router, with the ratio to
    the best baseline behind least_requests; then per run, attainment and TTFT at capacity and the balance."""
    lines: list[str] = []
    groups = dict.fromkeys((r["trace"], r["instances"]) for r in results)
    for trace, n in groups:
        rows = [r for r in results if r["trace"] == trace and r["instances"] == n]
        routers = list(dict.fromkeys(r["router"] for r in rows))
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        base = max((r["request_rate"] for r in rows if r["router"] == REFERENCE_ROUTER
                    and not r["policy"].startswith("fairbatching")), default=None)
        sc = rows[0]["scenario"]
        lines += [f"### {trace}, {n} instances", "",
                  f"Capacity in req/s (SLO attainment >= 90%, TTFT {sc['ttft_slo']:g} s / TPOT "
                  f"{sc['tpot_slo'] * 1e3:g} ms; loads {sc['load_interval']:g} s stale"
                  + (f"; first {sc['num_requests']} requests" if sc["num_requests"] else "") + ")"
                  + (f", and the ratio to the best baseline behind {REFERENCE_ROUTER}." if base else "."), "",
                  "| policy | " + " | ".join(routers) + " |", "|---|" + "---|" * len(routers)]
        for p in policies:
            cells = []
            for rt in routers:
                r = next((x for x in rows if x["policy"] == p and x["router"] == rt), None)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['request_rate']:.2f}"
                if base:
                    cell += f" ({r['request_rate'] / base:.2f}x)"
                if r["status"] != "ok":
                    cell += f" [{r['status']}]"
                cells.append(cell)
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += ["", "| policy | router | SLO att. | envelope att. | p99 TTFT ms | p99 TPOT ms | requests per "
                  "instance (min-max) | search wall s |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = _at_capacity(r)
            per = s.get("requests_per_instance") or []
            spread = f"{min(per)}-{max(per)}" if per else "-"
            lines.append(f"| {r['policy']} | {r['router']} | {_f(s.get('slo_attainment'), 3)} | "
                         f"{_f(s.get('envelope_attainment'), 3)} | {_f(s.get('p99_ttft_ms'), 0)} | "
                         f"{_f(s.get('p99_tpot_ms'), 1)} | {spread} | {r['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _f(x: Any, nd: int) -> str:
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else "-"


if __name__ == "__main__":
    main()
