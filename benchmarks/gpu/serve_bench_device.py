"""On the GPU machine: serve a model (dummy weights) with each policy, replay the first N
requests of a trace with `fairbatch bench` at fixed loads, then narrow each policy's
capacity with a few more runs (`fairbatch.metrics.find_capacity`, started from those runs:
geometric bisection between the highest load that met the SLO-attainment target and the
lowest that did not, or steps of 25 % out of the grid). Writes few files (the device tool
returns at most 8 per call): summary_<policies>.json with every bench result in full,
serve_<policy>.log and profile_<policy>.json (the step-time model the server refitted
while serving, from GET /profile; with --rounds, profile_<policy>_r<k>.json for the later
rounds, whose server logs stay in --work); the bench logs stay in --work. A table is
printed last. Stays inside --budget-s (a device call's limit).

    PYTHONPATH=src python benchmarks/gpu/serve_bench_device.py --policy sarathi --out $OUT \\
        --num 1000 --scales 3.5 4.2 4.9 --probes 2 --budget-s 560
    # a policy with settings of its own: --policy fairbatching:ttft_margin_quantile=0.9
    # two runs per cell, the order alternated: --policy fairbatching --policy qoserve --rounds 2
    # an engine flag's A/B: --policy fairbatching --policy fairbatching@--async-scheduling --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fairbatch.bench.prometheus_text import samples
from fairbatch.scheduler.variant import parse_variant
from fairbatch.metrics import find_capacity

FB = [sys.executable, "-m", "fairbatch.cli"]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


STEP_COUNTERS = ("engine_step_seconds", "engine_step_predicted_seconds", "engine_busy_seconds", "engine_step_tokens",
                 "engine_steps")


# the server's own TTFT (engine's first token - arrival at the engine), summed over labels:
# beside the client's, it splits the served TTFT into engine and served-stack offset
SERVER_TTFT = {"fairbatch:time_to_first_token_seconds_sum": "server_ttft_sum",
               "fairbatch:time_to_first_token_seconds_count": "server_ttft_count"}


def engine_counters(url: str) -> dict[str, float]:
    """The engine's cumulative step counters (and TTFT histogram sum/count) from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    wanted = {f"fairbatch:{name}_total": name for name in STEP_COUNTERS} | SERVER_TTFT
    out: dict[str, float] = {}
    for s in samples(text):
        if s.name in wanted:
            out[wanted[s.name]] = out.get(wanted[s.name], 0.0) + s.value
    return out


def save_profile(url: str, path: Path) -> None:
    """The server's step-time model as refitted while serving (GET /profile), so that
    `served_fidelity.py --profile` can simulate this host rather than the offline profile."""
    try:
        with urllib.request.urlopen(url + "/profile", timeout=10) as r:
            path.write_bytes(r.read())
    except OSError as e:
        print(f"no /profile from {url}: {e}", flush=True)


def triton_kernels() -> int:
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in root.glob("*/*.cubin")) if root.is_dir() else 0


def serve_args_of(spec: str) -> tuple[str, list[str]]:
    """A policy variant (``fairbatching:ttft_margin_quantile=0.9``) as `fairbatch serve`'s
    ``--policy NAME`` and its ``--set KEY=VALUE`` arguments, so that each policy of a call
    can run with settings of its own; after ``@``, comma-separated `fairbatch serve` flags
    of this cell alone (``fairbatching@--async-scheduling``: an engine option's A/B in
    one call, alternated with ``--rounds``)."""
    spec, _, flags = spec.partition("@")
    v = parse_variant(spec)
    sets = [f"{k}={val if isinstance(val, str) else json.dumps(val)}" for k, val in v.overrides]
    return v.name, [x for kv in sets for x in ("--set", kv)] + [f for f in flags.split(",") if f]


def file_label(spec: str) -> str:
    """``spec`` in file names (the device tool returns plain names only)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def bench(url: str, args: argparse.Namespace, policy: str, scale: float, work: Path, deadline: float,
          salt: int = 0) -> dict:
    """One replay at ``scale``. ``salt``: the how-manieth replay on this server; each gets
    prompts that share nothing with the earlier ones (`fairbatch bench --prompt-salt`),
    so the server's prefix cache cannot carry one load's prompts into the next."""
    path = work / f"bench_{file_label(policy)}_x{scale:g}.json"
    log = work / f"bench_{file_label(policy)}_x{scale:g}.log"
    cmd = FB + ["bench", "--base-url", url, "--model", args.model, "--trace", args.trace, "--num-prompts",
                str(args.num), "--rate-scale", f"{scale:g}", "--label", policy, "--no-save-detailed",
                "--save-result", str(path), "--workers", str(args.bench_workers), "--prompt-salt", str(salt),
                # a request the server refuses (503 past its pending limit) is an SLO miss of
                # the run, counted in its attainment, not a failed run
                "--max-failure-ratio", "1"]
    before, kernels = engine_counters(url), triton_kernels()
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(10.0, deadline - t0)).returncode
        except subprocess.TimeoutExpired:
            rc = "killed at the budget"
    if rc != 0 or not path.exists():
        return {"scale": scale, "error": f"bench exited {rc}", "wall_s": time.monotonic() - t0,
                "log_tail": log.read_text()[-2000:]}
    d = json.loads(path.read_text())
    r = d["runs"][0] if "runs" in d else d
    after = engine_counters(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (*STEP_COUNTERS, *SERVER_TTFT.values())}
    server_ttft_ms = 1e3 * delta["server_ttft_sum"] / max(1.0, delta["server_ttft_count"])
    n = max(1.0, delta["engine_steps"])
    engine = {"steps": delta["engine_steps"], "step_ms": 1e3 * delta["engine_step_seconds"] / n,
              "measured_over_predicted": delta["engine_step_seconds"] / max(1e-9, delta["engine_step_predicted_seconds"]),
              "busy_over_step": delta["engine_busy_seconds"] / max(1e-9, delta["engine_step_seconds"]),
              # what the scheduler's deadlines run on: step start to next step start, vs the model
              "busy_over_predicted": delta["engine_busy_seconds"] / max(1e-9, delta["engine_step_predicted_seconds"]),
              "tokens_per_step": delta["engine_step_tokens"] / n, "new_triton_kernels": triton_kernels() - kernels,
              # mean TTFT the client saw minus the engine's: HTTP, IPC, detokenizing, streaming
              "server_ttft_mean_ms": server_ttft_ms, "served_offset_ms": r["mean_ttft_ms"] - server_ttft_ms}
    return {"scale": scale, "result": r, "engine": engine, "rate": r.get("request_rate"), "completed": r["completed"], "failed": r.get("failed", 0),
            "ttft50": r["median_ttft_ms"], "ttft99": r["p99_ttft_ms"], "tpot50": r["median_tpot_ms"],
            "tpot99": r["p99_tpot_ms"], "att": r["slo_attainment"], "hit_rate": r.get("prefix_cache_hit_rate"), "goodput": r.get("request_goodput"),
            "wall_s": time.monotonic() - t0}


class OutOfBudget(Exception):
    """The next run would not end inside --budget-s, or --probes runs are spent."""


# A served run costs minutes of GPU, and the grid of --scales is chosen near capacity: the
# probes step out of it by 25 % (not metrics.capacity's default doubling), and stop after
# --probes runs rather than at a tolerance.
PROBE_FACTOR = 1.25


def bracket(done: dict[float, dict], target: float) -> tuple[float | None, float | None]:
    """(highest scale that met ``target``, lowest that missed it above that) among the runs
    made (``done``: scale -> row; a failed run counts as missed)."""
    ok = {s: row.get("att", 0.0) >= target for s, row in done.items()}
    good = max((s for s in done if ok[s]), default=None)
    bad = min((s for s in done if not ok[s] and (good is None or s > good)), default=None)
    return good, bad


def probe_capacity(run: Callable[[float], dict], done: dict[float, dict], probes: int, target: float) -> None:
    """Up to ``probes`` more runs after the grid (``done``), chosen by metrics.capacity's
    search: geometric bisection between the bracket's two scales, or, when every run so far
    met (missed) the target, steps of PROBE_FACTOR above the highest (below the lowest).
    ``run(scale)`` records its row in ``done``; probes are rounded to 3 decimals (the runs'
    labels and file names). Raises OutOfBudget when a run would not fit or the probes are
    spent."""
    if not done or probes <= 0:
        return
    good, bad = bracket(done, target)
    made = [0]

    def summary(row: dict) -> dict:
        return row.get("result", {})          # no result (bench failed): no attainment, a miss

    def probe(scale: float) -> dict:
        if made[0] == probes:
            raise OutOfBudget
        made[0] += 1
        return summary(run(scale))

    seen = {s: (s, row.get("rate") or 0.0, summary(row)) for s, row in done.items()}
    find_capacity(probe, lo=good if good is not None else min(done), hi=bad if good is not None else None,
                  target=target, rel_tol=0.0, max_iter=probes, max_expand=probes, factor=PROBE_FACTOR, decimals=3,
                  seen=seen)


def serve_and_run(policy: str, port: int, log_path: Path, profile_path: Path, args: argparse.Namespace,
                  end: float, rows: list[dict], rnd: int) -> dict | None:
    """Start a server for ``policy``, run the grid of scales and the capacity probes
    against it (rows appended to ``rows``, tagged with the round), save its refitted
    profile, stop it. Returns its capacity entry, or None if it did not come up."""
    url = f"http://127.0.0.1:{port}"
    name, own_args = serve_args_of(policy)
    log = open(log_path, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(FB + ["serve", "--model", args.model, "--load-format", "dummy", "--policy", name,
                                  "--port", str(port), "--log-level", "warning", *own_args, *args.serve_arg],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_healthy(url, proc, min(400.0, end - time.monotonic())):
            print(f"{policy}: server did not come up; see {log_path.name}", flush=True)
            return None
        # the cache's total (earlier servers' and tests' kernels included); `jit` in the
        # table counts the ones compiled while a run was being served
        print(f"{policy}: healthy after {time.monotonic() - t0:.0f} s, {triton_kernels()} Triton kernels "
              f"in the cache" + (f" (round {rnd + 1})" if rnd else ""), flush=True)
        done: dict[float, dict] = {}
        longest = 0.0
        work = args.work if rnd == 0 else args.work / f"round{rnd + 1}"   # its bench files beside the first round's
        work.mkdir(exist_ok=True)

        def run(scale: float) -> dict:
            """One bench run at ``scale``: its row, or OutOfBudget if it would not end in time."""
            nonlocal longest
            # a run at a higher load takes no longer than the slowest so far, give or take
            if longest and time.monotonic() + 1.15 * longest > end:
                print(f"{policy} x{scale:g}: skipped (budget)", flush=True)
                raise OutOfBudget
            row = bench(url, args, policy, scale, work, end, salt=len(done))
            longest = max(longest, row["wall_s"])
            row["policy"] = policy
            row["round"] = rnd + 1
            rows.append(row)
            done[scale] = row
            print(json.dumps({k: v for k, v in row.items() if k != "result"}), flush=True)
            return row

        try:
            for s in args.scales:
                run(s)
            probe_capacity(run, done, args.probes, args.target)
        except OutOfBudget:
            pass
        save_profile(url, profile_path)
        good, bad = bracket(done, args.target)
        return {"capacity_scale": good, "first_failing_scale": bad,
                "capacity_rate": done[good]["rate"] if good is not None else None}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except ProcessLookupError:
            pass              # the server had already exited
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", action="append", required=True)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--scales", type=float, nargs="+", default=[3.5, 4.2, 4.9])
    ap.add_argument("--probes", type=int, default=2, help="extra capacity runs per policy")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every policy this many times, each on a fresh server, every other round in "
                         "reverse order (runs per cell, alternated)")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--port", type=int, default=8100)
    # one client process spends ~146 us of CPU per streamed token, in bursts of a step's
    # tokens: at the ~4,000 tokens/s of the conversation window at x4-x5 (2026-12-07, one
    # client process) the clients' TTFT was 70-180 ms above the engine's, part of it this
    ap.add_argument("--bench-workers", type=int, default=4, help="`fairbatch bench --workers`")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `fairbatch serve` argument")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/fairbatch-serve-bench")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/fairbatch-serve-bench-work"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget_s
    rows: list[dict] = []
    summary: dict[str, dict] = {}
    for rnd in range(args.rounds):
        # each round a fresh server per policy; every other round in the reverse order, so
        # that no policy always runs first on a GPU that warms (RESULTS.md, H100 runs)
        order = list(enumerate(args.policy))
        for i, policy in (order if rnd % 2 == 0 else order[::-1]):
            key = policy if rnd == 0 else f"{policy} (round {rnd + 1})"
            suffix = "" if rnd == 0 else f"_r{rnd + 1}"
            # later rounds' server logs stay in --work: the device tool returns few files
            log_dir = args.out if rnd == 0 else args.work
            entry = serve_and_run(policy, args.port + i, log_dir / f"serve_{file_label(policy)}{suffix}.log",
                                  args.out / f"profile_{file_label(policy)}{suffix}.json", args, end, rows, rnd)
            if entry is not None:
                summary[key] = entry
    (args.out / f"summary_{'_'.join(map(file_label, args.policy))}.json").write_text(json.dumps({"rows": rows, "capacity": summary, "serve_args": args.serve_arg},
                                                                              indent=1))
    print(f"{'policy':13s} {'scale':>6s} {'rate':>6s} {'done':>5s} {'fail':>4s} {'ttft50':>7s} {'ttft99':>7s} "
          f"{'tpot50':>6s} {'tpot99':>6s} {'att':>6s} {'goodput':>7s} {'wall':>5s} {'stepms':>6s} {'meas/pred':>9s} "
          f"{'busy/step':>9s} {'busy/pred':>9s} {'offset':>6s} {'jit':>4s}")
    for r in rows:
        label = r["policy"] + (f" r{r['round']}" if args.rounds > 1 else "")
        if "error" in r:
            print(f"{label:13s} {r['scale']:6g} {r['error']}")
            continue
        print(f"{label:13s} {r['scale']:6g} {r['rate']:6.2f} {r['completed']:5d} {r['failed']:4d} "
              f"{r['ttft50']:7.0f} {r['ttft99']:7.0f} {r['tpot50']:6.1f} {r['tpot99']:6.1f} {r['att']:6.3f} "
              f"{r['goodput'] if r['goodput'] is not None else float('nan'):7.2f} {r['wall_s']:5.0f} {r['engine']['step_ms']:6.1f} "
              f"{r['engine']['measured_over_predicted']:9.2f} {r['engine']['busy_over_step']:9.2f} "
              f"{r['engine']['busy_over_predicted']:9.2f} {r['engine']['served_offset_ms']:6.0f} "
              f"{r['engine']['new_triton_kernels']:4d}")
    for p, c in summary.items():
        print(f"capacity {p}: scale {c['capacity_scale']} ({c['capacity_rate']} req/s), first failing {c['first_failing_scale']}")


if __name__ == "__main__":
    main()
