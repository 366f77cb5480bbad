"""What the served stack adds to TTFT, without a GPU: `fairbatch serve --load-format
simulated` (steps last what the H100 step-time profile predicts, tokens are synthetic;
the scheduler, front end and metrics are the real ones), `fairbatch bench` replaying a
bundled trace against it, and per rate scale:

- client TTFT (what `fairbatch bench` measured) vs server TTFT (HTTP arrival at the front
  end -> the engine step that made the first token ended; `/metrics`'
  time_to_first_token_seconds) and their difference, the served offset;
- the front end's first-token delivery delay (step end -> hand-off to the client's
  stream; `/metrics`' first_token_delivery_seconds), mean and p90/p99 from its buckets;
- streamed tokens/s, and CPU microseconds per streamed token of the front-end process,
  the engine process and the bench client's processes (from /proc and getrusage: Linux).

On a small machine these numbers are CPU-bound: the front end, the engine loop and the
bench client share its cores, so run before/after comparisons back to back.

    PYTHONPATH=src python benchmarks/micro/served_delay.py --num-prompts 600 --rate-scale 4 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from fairbatch.bench.prometheus_text import samples
from fairbatch.cluster.launcher import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "abuse"))
from tiny_server import running  # noqa: E402  (a fairbatch subprocess, healthy while in use)

FB = [sys.executable, "-m", "fairbatch.cli"]
TICKS = os.sysconf("SC_CLK_TCK")
TTFT = "time_to_first_token_seconds"
DELIVERY = "first_token_delivery_seconds"


def process_cpu(pid: int) -> float:
    """User + system seconds of one process (its threads, not its children)."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / TICKS     # utime, stime


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def children_cpu() -> float:
    """CPU seconds of this process's finished, waited-for children and their descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def scrape(url: str, prefix: str = "fairbatch") -> dict[str, float]:
    """Histogram sums, counts and cumulative buckets (``name_bucket:le``) of interest."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for s in samples(text):
        name = s.name.removeprefix(prefix + ":")
        if name.startswith((TTFT, DELIVERY)):
            key = f"{name}:{s.labels['le']}" if name.endswith("_bucket") else name
            out[key] = out.get(key, 0.0) + s.value
    return out


def quantile_ms(delta: dict[str, float], name: str, q: float) -> float | None:
    """The ``q`` quantile of a histogram's new observations, interpolated in its buckets
    (Prometheus' histogram_quantile), in ms."""
    buckets = sorted((float(k.split(":", 1)[1]), v) for k, v in delta.items() if k.startswith(name + "_bucket:"))
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lo_le, lo_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return 1e3 * lo_le
            return 1e3 * (lo_le + (le - lo_le) * (rank - lo_n) / max(1e-12, n - lo_n))
        lo_le, lo_n = le, n
    return None


def run_once(url: str, server: subprocess.Popen, args: argparse.Namespace, scale: float, salt: int) -> dict:
    engine_pids = child_pids(server.pid)
    before, cpu0 = scrape(url), (process_cpu(server.pid), sum(map(process_cpu, engine_pids)), children_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        cmd = FB + ["bench", "--base-url", url, "--trace", args.trace, "--num-prompts", str(args.num_prompts),
                    "--rate-scale", f"{scale:g}", "--workers", str(args.workers), "--prompt-salt", str(salt),
                    "--no-save-detailed", "--save-result", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.exists():
            raise SystemExit(f"bench failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        data = json.loads(path.read_text())
    r = data["runs"][0] if "runs" in data else data
    after = scrape(url)
    cpu1 = (process_cpu(server.pid), sum(map(process_cpu, engine_pids)), children_cpu())
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    tokens = max(1, r["total_output_tokens"])
    server_ttft = 1e3 * d[TTFT + "_sum"] / max(1.0, d[TTFT + "_count"])
    return {
        "rate_scale": scale, "completed": r["completed"], "failed": r.get("failed", 0),
        "tokens_per_s": r["output_throughput"], "duration_s": r["duration"],
        "client_ttft_mean_ms": r["mean_ttft_ms"], "client_ttft_p99_ms": r["p99_ttft_ms"],
        "server_ttft_mean_ms": server_ttft, "served_offset_ms": r["mean_ttft_ms"] - server_ttft,
        "delivery_mean_ms": 1e3 * d.get(DELIVERY + "_sum", 0.0) / max(1.0, d.get(DELIVERY + "_count", 0.0)),
        "delivery_p90_ms": quantile_ms(d, DELIVERY, 0.9), "delivery_p99_ms": quantile_ms(d, DELIVERY, 0.99),
        "front_end_us_per_token": 1e6 * (cpu1[0] - cpu0[0]) / tokens,
        "engine_us_per_token": 1e6 * (cpu1[1] - cpu0[1]) / tokens,
        "client_us_per_token": 1e6 * (cpu1[2] - cpu0[2]) / tokens,
        "client_tpot_mean_ms": r["mean_tpot_ms"], "client_itl_p99_ms": r["p99_itl_ms"],
        "slo_attainment": r.get("slo_attainment"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b", help="a preset with a shipped step-time profile")
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--rate-scale", type=float, nargs="+", default=[4.0])
    ap.add_argument("--workers", type=int, default=1, help="`fairbatch bench --workers`")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `fairbatch serve` argument "
                    "(repeatable; e.g. --serve-arg=--engine-thread)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()

    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    rows = []
    with running(["serve", "--model", args.model, "--load-format", "simulated", "--port", str(port),
                  "--log-level", "warning", *args.serve_arg], url) as server:
        for salt, scale in enumerate(args.rate_scale):
            rows.append(run_once(url, server, args, scale, salt))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'scale':>5} {'tok/s':>6} {'TTFT client':>11} {'server':>7} {'offset':>7} {'delivery':>8} "
          f"{'p99':>5} {'us/token: front':>15} {'engine':>6} {'client':>6}")
    for r in rows:
        p99 = r["delivery_p99_ms"]
        print(f"{r['rate_scale']:5g} {r['tokens_per_s']:6.0f} {r['client_ttft_mean_ms']:9.1f}ms {r['server_ttft_mean_ms']:6.1f} "
              f"{r['served_offset_ms']:7.1f} {r['delivery_mean_ms']:8.2f} {p99 if p99 is not None else float('nan'):5.1f} "
              f"{r['front_end_us_per_token']:15.0f} {r['engine_us_per_token']:6.0f} {r['client_us_per_token']:6.0f}")
    if args.out:
        args.out.write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
