"""On a machine with 2 GPUs: optionally profile the model's step times on GPU 0 (`fairbatch
profile --quick`), then start a two-replica `fairbatch cluster` (local processes, one GPU
each, dummy weights) with the router in front, and replay the first N requests of a trace
through the router with `fairbatch bench` at a few loads. Around every run it scrapes the
router's /metrics (requests answered per backend) and each replica's /metrics (finished
requests, engine steps), so each run records how the router split the load (the split in the
table: requests each replica finished, bench's warm-up request included). Writes few
files (the device tool returns at most 8 per call): cluster_summary.json with everything
(every bench result in full), cluster.log, profile_replica<i>.json (each replica's step-time
model as refitted while serving, GET /profile) and profile_<model>_<gpu>.json if profiled; the
bench logs and replica logs stay in --work (their tails go into the summary). A table is
printed last. Stays inside --budget-s (a device call's limit).

    PYTHONPATH=src python benchmarks/gpu/cluster_bench_device.py --profile-gpu --out $OUT \\
        --num 1000 --scales 4 5.6 7.2 --budget-s 560

Replica options go through --replica-arg (split like a shell line), e.g. the profile just
made: --replica-arg "--profile $OUT/profile_llama-3-8b_h200.json" (without one the replicas
start from the H200 roofline and refit it online, `fairbatch serve`'s default).

Run so far on CPU with tiny replicas only (the 2-GPU run is still to do).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fairbatch.bench.prometheus_text import samples

FB = [sys.executable, "-m", "fairbatch.cli"]


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """A Prometheus /metrics page as (name, labels, value) rows."""
    return [(s.name, s.labels, s.value) for s in samples(get(url + "/metrics")[1].decode())]


def counters(router: str, replicas: list[str]) -> dict:
    """Router requests per backend, and each replica's own cumulative counters."""
    out: dict = {"router": {}, "replicas": {}}
    for name, lab, v in scrape(router):
        if name == "fairbatch_router:requests_total":
            out["router"][lab["backend"]] = out["router"].get(lab["backend"], 0.0) + v
        elif name == "fairbatch_router:retries_total":
            out["router"]["retries"] = out["router"].get("retries", 0.0) + v
    for u in replicas:
        c = out["replicas"][u] = {}
        for name, _, v in scrape(u):
            key = name.removeprefix("fairbatch:").removesuffix("_total")
            if key in ("request_success", "request_rejected", "request_aborted", "engine_steps",
                       "engine_step_seconds", "engine_step_predicted_seconds", "generation_tokens"):
                c[key] = c.get(key, 0.0) + v
    return out


def diff(a: dict, b: dict) -> dict:
    return {k: diff(a.get(k, {}), v) if isinstance(v, dict) else v - a.get(k, 0.0) for k, v in b.items()}


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def bench(url: str, replicas: list[str], args: argparse.Namespace, scale: float, deadline: float) -> dict:
    path, log = args.work / f"bench_x{scale:g}.json", args.work / f"bench_x{scale:g}.log"
    path.unlink(missing_ok=True)
    cmd = FB + ["bench", "--base-url", url, "--model", args.model, "--trace", "azure-conv", "--num-prompts",
                str(args.num), "--rate-scale", f"{scale:g}", "--label", f"{args.policy}+{args.router}",
                "--no-save-detailed", "--save-result", str(path), "--workers", str(args.bench_workers)]
    before = counters(url, replicas)
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=max(10.0, deadline - t0)).returncode
        except subprocess.TimeoutExpired:
            rc = "killed at the budget"
    wall = time.monotonic() - t0
    delta = diff(before, counters(url, replicas))
    # requests each replica finished (its own counter); bench's one warm-up request is in there too
    split = [int(delta["replicas"][u].get("request_success", 0)) for u in replicas]
    if rc != 0 or not path.exists():
        return {"scale": scale, "error": f"bench exited {rc}", "wall_s": wall, "counters": delta, "split": split,
                "log_tail": tail(log, 2000)}
    d = json.loads(path.read_text())
    r = d["runs"][0] if "runs" in d else d
    return {"scale": scale, "result": r, "counters": delta, "split": split, "rate": r.get("request_rate"),
            "completed": r["completed"], "failed": r.get("failed", 0), "ttft50": r["median_ttft_ms"],
            "ttft99": r["p99_ttft_ms"], "tpot50": r["median_tpot_ms"], "tpot99": r["p99_tpot_ms"],
            "att": r["slo_attainment"], "goodput": r["request_goodput"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--policy", default="fairbatching")
    ap.add_argument("--router", default="admission")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--scales", type=float, nargs="+", default=[4.0, 5.6, 7.2])
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/fairbatch-cluster-bench")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/fairbatch-cluster-work"))
    ap.add_argument("--profile-gpu", action="store_true", help="first run `fairbatch profile --quick` on GPU 0")
    ap.add_argument("--gpu-name", default="h200", help="GPU name in the profile's file name")
    ap.add_argument("--router-workers", type=int, default=1, help="`fairbatch cluster --router-workers`")
    ap.add_argument("--bench-workers", type=int, default=1, help="`fairbatch bench --workers`")
    ap.add_argument("--replica-arg", action="append", default=[],
                    help="extra `fairbatch serve` arguments for every replica (split like a shell line)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget_s
    summary: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": []}
    if args.profile_gpu:
        prof, plog = args.out / f"profile_{args.model}_{args.gpu_name}.json", args.work / "profile.log"
        t0 = time.monotonic()
        with open(plog, "w") as f:
            try:
                rc = subprocess.run(FB + ["profile", "--model", args.model, "--load-format", "dummy", "--quick",
                                          "--out", str(prof)], check=False, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, "CUDA_VISIBLE_DEVICES": "0", "COLUMNS": "200"},
                                    timeout=max(10.0, min(300.0, end - t0 - 120))).returncode
            except subprocess.TimeoutExpired:
                rc = "killed at its time box"
        summary["profile"] = {"rc": rc, "wall_s": time.monotonic() - t0, "path": str(prof) if prof.exists() else None,
                              "log_tail": tail(plog, 1500)}
        print(f"profile: exit {rc} after {summary['profile']['wall_s']:.0f} s", flush=True)
    url = f"http://127.0.0.1:{args.port}"
    clog_path = args.work / "cluster.log"
    replica_args = [a for s in args.replica_arg for a in shlex.split(s)]
    t0 = time.monotonic()
    with open(clog_path, "w") as clog:
        proc = subprocess.Popen(FB + ["cluster", "--model", args.model, "--load-format", "dummy", "--replicas", "2",
                                      "--launcher", "local", "--policy", args.policy, "--router", args.router,
                                      "--port", str(args.port), "--log-level", "warning",
                                      "--router-workers", str(args.router_workers), "--start-timeout",
                                      f"{max(30.0, end - t0 - 60):.0f}", "--log-dir", str(args.work / "replicas"),
                                      *replica_args],
                                stdout=clog, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "COLUMNS": "200"})
    try:
        up = False
        while not up and proc.poll() is None and time.monotonic() < min(end - 30, t0 + 500):
            code, body = get(url + "/health", 2)
            up = code == 200 and json.loads(body)["healthy_backends"] == json.loads(body)["backends"]
            time.sleep(0 if up else 1)
        summary["startup_s"] = time.monotonic() - t0
        if not up:
            print(f"cluster did not come up in {summary['startup_s']:.0f} s; see cluster.log", flush=True)
            return
        backends = json.loads(get(url + "/backends")[1])["backends"]
        summary["backends"] = backends
        replicas = [b["url"] for b in backends]
        print(f"cluster healthy after {summary['startup_s']:.0f} s: {', '.join(replicas)}", flush=True)
        longest = 0.0
        for s in args.scales:
            # a run at a higher load takes no longer than the slowest so far, give or take
            if longest and time.monotonic() + 1.15 * longest > end:
                print(f"x{s:g}: skipped (budget)", flush=True)
                continue
            row = bench(url, replicas, args, s, end)
            longest = max(longest, row["wall_s"])
            summary["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("result", "counters")}), flush=True)
        # each replica's step-time model as refitted while serving: what the simulator's
        # prediction for this setup should use (`fairbatch simulate --profile`)
        for i, u in enumerate(replicas):
            code, body = get(u + "/profile")
            if code == 200:
                (args.out / f"profile_replica{i}.json").write_bytes(body)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        summary["replica_log_tails"] = {p.name: tail(p) for p in sorted((args.work / "replicas").glob("*.log"))}
        shutil.copy(clog_path, args.out / "cluster.log")
        (args.out / "cluster_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{'scale':>6s} {'rate':>6s} {'done':>5s} {'fail':>4s} {'ttft50':>7s} {'ttft99':>7s} {'tpot50':>6s} "
          f"{'tpot99':>6s} {'att':>6s} {'goodput':>7s} {'wall':>5s}  split")
    for r in summary["rows"]:
        split = "/".join(map(str, r["split"]))
        if "error" in r:
            print(f"{r['scale']:6g} {r['error']}  {split}")
            continue
        print(f"{r['scale']:6g} {r['rate']:6.2f} {r['completed']:5d} {r['failed']:4d} {r['ttft50']:7.0f} "
              f"{r['ttft99']:7.0f} {r['tpot50']:6.1f} {r['tpot99']:6.1f} {r['att']:6.3f} {r['goodput']:7.2f} "
              f"{r['wall_s']:5.0f}  {split}")


if __name__ == "__main__":
    main()
