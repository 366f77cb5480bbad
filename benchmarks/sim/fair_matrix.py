"""The fair capacity matrix (docs/RESULTS.md): every policy with the same late-request
handling, the token-budget baselines at the best value of a swept grid (and at their
default/recipe, as rows of their own), capacity at 90 % and 99 % SLO attainment with
every request counted, and the tails of served requests at capacity.

Each job is one capacity search (both targets, runs shared) of one policy variant in one
cell (trace x SLO setting x late mode). Results are appended to ``fair_matrix.json`` as
they finish, and a rerun skips the jobs already there, so the matrix can be built in
pieces on a small machine.

    python benchmarks/sim/fair_matrix.py --out docs/results --jobs 2                 # every cell
    python benchmarks/sim/fair_matrix.py --trace azure-code --slo default --late relegate
    python benchmarks/sim/fair_matrix.py --report-only --out docs/results            # tables only
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fairbatch.sim.experiment import Scenario, capacities, prepare

SLO_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"ttft_slo": 1.0, "tpot_slo": 0.05},
    "tight": {"ttft_slo": 0.5, "tpot_slo": 0.03},
    "loose": {"ttft_slo": 3.0, "tpot_slo": 0.1},
    "mixed": {"slo_classes": "interactive:0.5:0.03:0.3,batch:5:0.15:0.7"},
}
SLO_TEXT = {"default": "TTFT 1 s, TPOT 50 ms", "tight": "TTFT 0.5 s, TPOT 30 ms", "loose": "TTFT 3 s, TPOT 100 ms",
            "mixed": "30 % 0.5 s/30 ms, 70 % 5 s/150 ms"}
LATE_MODES = ("serve", "relegate", "reject")
# The cells run by default: every late mode at the default SLOs, relegate elsewhere.
DEFAULT_CELLS = [(slo, late) for slo in SLO_SETTINGS for late in LATE_MODES if slo == "default" or late == "relegate"]
SARATHI_GRID = (512, 768, 1024, 1536, 2048, 3072)
VLLM_GRID = (1024, 2048, 4096, 8192)
START = {"azure-conv": 2.0, "azure-code": 0.35}   # first rate scale tried (near capacity)


def variants(slo: str) -> dict[str, str]:
    """label -> policy variant. ``:B`` labels are grid points of a tuned baseline."""
    out = {f"sarathi:{b}": f"sarathi:chunk_size={b}" for b in SARATHI_GRID}
    out |= {f"vllm:{b}": f"vllm:max_num_batched_tokens={b}" for b in VLLM_GRID}
    out["sarathi recipe"] = "sarathi"
    out["qoserve"] = "qoserve"
    out["fairbatching"] = "fairbatching"
    # without the set-aside the other policies lack (with the work weight it had before)
    out["fairbatching, no set-aside"] = "fairbatching:set_aside=false,prefill_work_weight=0.0005"
    if slo == "mixed":
        out |= {f"vllm-priority:{b}": f"vllm-priority:max_num_batched_tokens={b}" for b in VLLM_GRID}
    return out


def one(job: dict[str, Any]) -> dict[str, Any]:
    sc = Scenario(trace=job["trace"], scheduler={"late": job["late"]}, **SLO_SETTINGS[job["slo"]])
    t0 = time.perf_counter()
    caps = capacities(prepare(sc), job["variant"], targets=(0.9, 0.99), lo=START[job["trace"]])
    out = dict(job, wall_s=time.perf_counter() - t0)
    for t, c in caps.items():
        at = next((p[2] for p in c.points if p[0] == c.rate_scale), {})
        out[str(t)] = {"rate_scale": c.rate_scale, "request_rate": c.request_rate, "status": c.status,
                       "at": {k: at.get(k) for k in ("slo_attainment", "ttft_attainment", "tpot_attainment",
                                                     "p99_ttft_ms", "median_ttft_ms", "p99_tpot_ms",
                                                     "rejected", "relegated", "completed", "failed")}}
    out["points"] = [{"rate_scale": p[0], "request_rate": p[1], "slo_attainment": p[2]["slo_attainment"]}
                     for p in caps[0.9].points]
    return out


def key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    return (r["trace"], r["slo"], r["late"], r["label"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--trace", action="append", choices=list(START))
    ap.add_argument("--slo", action="append", choices=list(SLO_SETTINGS))
    ap.add_argument("--late", action="append", choices=LATE_MODES)
    ap.add_argument("--label", action="append", help="only these rows (e.g. qoserve)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    path = args.out / "fair_matrix.json"
    results: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {key(r) for r in results}
    if not args.report_only:
        cells = [(s, lt) for s, lt in DEFAULT_CELLS if (not args.slo or s in args.slo)
                 and (not args.late or lt in args.late)]
        if args.slo and args.late:   # an explicit cell may be outside the default set
            cells = [(s, lt) for s in args.slo for lt in args.late]
        jobs = [{"trace": tr, "slo": s, "late": lt, "label": lb, "variant": v}
                for tr in (args.trace or list(START)) for s, lt in cells
                for lb, v in variants(s).items()
                if (not args.label or lb in args.label or lb.split(":")[0] in args.label)
                and (tr, s, lt, lb) not in done]
        # longest first (the conversation trace), so the pool ends together
        jobs.sort(key=lambda j: j["trace"] != "azure-conv")
        print(f"{len(jobs)} capacity searches to run", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(args.jobs) as pool:
            for f in as_completed([pool.submit(one, j) for j in jobs]):
                r = f.result()
                results.append(r)
                print(f"{r['trace']:10s} {r['slo']:8s} {r['late']:8s} {r['label']:22s} "
                      f"{r['0.9']['request_rate']:6.2f} / {r['0.99']['request_rate']:6.2f} req/s "
                      f"({r['wall_s']:.0f} s)", flush=True)
                path.write_text(json.dumps(results, indent=1) + "\n")
    report = write_report(results)
    (args.out / "fair_matrix.md").write_text(report)
    print(report)


def _best(group: list[dict[str, Any]], prefix: str, t: str) -> dict[str, Any] | None:
    cands = [r for r in group if r["label"].startswith(prefix + ":")]
    if not cands:
        return None
    return max(cands, key=lambda r: (r[t]["request_rate"], -int(r["label"].split(":")[1])))


def rows_of(group: list[dict[str, Any]]) -> list[tuple[str, dict | None, dict | None]]:
    """(row label, result at 90 %, result at 99 %) for each policy of one cell."""
    rows = []
    for name in ("vllm", "vllm-priority", "sarathi"):
        b90, b99 = _best(group, name, "0.9"), _best(group, name, "0.99")
        if b90:
            rows.append((f"{name}, best budget", b90, b99))
    by = {r["label"]: r for r in group}
    for label, row in (("vllm, default budget (8192)", "vllm:8192"), ("sarathi, recipe budget", "sarathi recipe"),
                       ("qoserve", "qoserve"), ("fairbatching, no set-aside", "fairbatching, no set-aside"),
                       ("fairbatching", "fairbatching")):
        if row in by:
            rows.append((label, by[row], by[row]))
    return rows


def write_report(results: list[dict[str, Any]]) -> str:
    lines = []
    cells = dict.fromkeys((r["trace"], r["slo"], r["late"]) for r in results)
    for trace, slo, late in sorted(cells, key=lambda c: (c[0], list(SLO_SETTINGS).index(c[1]), LATE_MODES.index(c[2]))):
        group = [r for r in results if (r["trace"], r["slo"], r["late"]) == (trace, slo, late)]
        rows = rows_of(group)
        base = {t: max((r[t]["request_rate"] for lb, r90, r99 in rows if not lb.startswith("fairbatching")
                        for r in ([r90] if t == "0.9" else [r99]) if r), default=0.0) for t in ("0.9", "0.99")}
        lines += [f"#### {trace}, {slo} SLOs ({SLO_TEXT[slo]}), late={late}", "",
                  "| policy | capacity at 90 % req/s | at 99 % req/s | vs best baseline at 90 / 99 % "
                  "| at 90 % capacity: TTFT p50 / p99 ms (served) | TPOT p99 ms | rejected | relegated |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r90, r99 in rows:
            c90, c99 = r90["0.9"], r99["0.99"]
            b90 = f" ({r90['label'].split(':')[1]})" if "best" in label else ""
            b99 = f" ({r99['label'].split(':')[1]})" if "best" in label else ""
            rel = "-"
            if base["0.9"] and base["0.99"]:
                rel = f"{c90['request_rate'] / base['0.9']:.2f}x / {c99['request_rate'] / base['0.99']:.2f}x"
            at = c90["at"]
            n = (at.get("completed") or 0) + (at.get("failed") or 0)
            lines.append(
                f"| {label} | {c90['request_rate']:.2f}{b90} | {c99['request_rate']:.2f}{b99} | {rel} | "
                f"{_ms(at.get('median_ttft_ms'))} / {_ms(at.get('p99_ttft_ms'))} | {_ms(at.get('p99_tpot_ms'), 1)} | "
                f"{at.get('rejected', 0)}/{n} | {at.get('relegated', 0)}/{n} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _ms(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
