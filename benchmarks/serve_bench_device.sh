#!/usr/bin/env bash
# On the GPU machine: serve llama-3-8b (dummy bf16 weights) with each policy and replay the
# first N requests of the Azure conversation trace with `fairbatch bench` at three loads.
# Writes every bench JSON and server log under $OUT; prints a table last.
#
#   OUT=/tmp/out NUM=400 SCALES="2.5 3.5 4.5" bash benchmarks/serve_bench_device.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fairbatch-serve-bench}"; mkdir -p "$OUT"
NUM="${NUM:-400}"; SCALES="${SCALES:-2.5 3.5 4.5}"; POLICIES="${POLICIES:-vllm sarathi fairbatching}"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
FB="python3 -m fairbatch.cli"
port=8000
for policy in $POLICIES; do
    port=$((port + 1))   # a fresh port per server: the last one's socket may linger
    [ "$(date +%s)" -lt "$DEADLINE" ] || { echo "out of time before $policy"; break; }
    $FB serve --model "${MODEL:-llama-3-8b}" --load-format dummy --policy "$policy" --port "$port" --no-access-log ${EXTRA_SERVE:-} \
        > "$OUT/serve_$policy.log" 2>&1 &
    pid=$!
    up=0
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && { up=1; break; }
        kill -0 "$pid" 2>/dev/null || break      # the server died: its log says why
        sleep 1
    done
    if [ "$up" != 1 ]; then echo "$policy: server did not come up:"; tail -5 "$OUT/serve_$policy.log"; continue; fi
    echo "$policy: server up at ${SECONDS}s"
    for s in $SCALES; do
        [ "$(date +%s)" -lt "$DEADLINE" ] || break
        $FB bench --base-url "http://127.0.0.1:$port" --model "${MODEL:-llama-3-8b}" --trace azure-conv \
            --num-prompts "$NUM" --rate-scale "$s" --label "$policy" --no-save-detailed \
            --save-result "$OUT/bench_${policy}_x$s.json" > "$OUT/bench_${policy}_x$s.log" 2>&1 \
            || echo "bench $policy x$s failed (see log)"
    done
    kill "$pid"; wait "$pid" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    d = json.loads(p.read_text())
    r = d["runs"][0] if "runs" in d else d
    rows.append((p.stem, r.get("request_rate", 0), r["completed"], r.get("failed", 0), r["median_ttft_ms"],
                 r["p99_ttft_ms"], r["median_tpot_ms"], r["p99_tpot_ms"], r["slo_attainment"], r["request_goodput"]))
print(f"{'run':28s} {'rate':>6s} {'done':>5s} {'fail':>4s} {'ttft50':>7s} {'ttft99':>7s} {'tpot50':>6s} {'tpot99':>6s} {'att':>6s} {'goodput':>7s}")
for r in rows:
    print(f"{r[0]:28s} {r[1]:6.2f} {r[2]:5d} {r[3]:4d} {r[4]:7.0f} {r[5]:7.0f} {r[6]:6.1f} {r[7]:6.1f} {r[8]:6.3f} {r[9]:7.2f}")
PY
