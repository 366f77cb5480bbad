#!/usr/bin/env bash
# On a one-GPU machine: two `fairbatch serve` replicas of MODEL sharing the GPU (each with
# a bit under half its memory), `fairbatch route` in front, and `fairbatch bench` through
# the router at a few loads. (`fairbatch cluster` places one replica per GPU; sharing one
# is only for this measurement.) Bench JSONs, per-replica request counts and the logs go
# under $OUT; a table is printed last.
#
#   OUT=/tmp/out NUM=800 SCALES="2.8 3.4 4.0" ROUTER=admission bash benchmarks/gpu/cluster_shared_gpu_device.sh
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/fairbatch-shared-gpu}"; mkdir -p "$OUT"
MODEL="${MODEL:-llama-3-8b}"; NUM="${NUM:-800}"; SCALES="${SCALES:-2.8 3.4 4.0}"
POLICY="${POLICY:-fairbatching}"; ROUTER="${ROUTER:-admission}"
FB="python3 -m fairbatch.cli"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
healthy() { for _ in $(seq 300); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
# One at a time: each sizes its KV cache from the memory the other left.
for i in 0 1; do
    setsid $FB serve --model "$MODEL" --load-format dummy --policy "$POLICY" --port "810$i" \
        --gpu-memory-utilization 0.44 --log-level warning ${EXTRA_SERVE:-} > "$OUT/serve$i.log" 2>&1 &
    pids+=($!)
    healthy "http://127.0.0.1:810$i" || { echo "replica $i did not come up"; tail -5 "$OUT/serve$i.log"; exit 1; }
done
setsid $FB route --backend http://127.0.0.1:8100 --backend http://127.0.0.1:8101 --router "$ROUTER" \
    --port 8200 --log-level warning > "$OUT/route.log" 2>&1 &
pids+=($!)
healthy http://127.0.0.1:8200 || { echo "router did not come up"; exit 1; }
echo "replicas and router up at ${SECONDS}s"
done_count() {   # requests a replica finished, from its /metrics (prometheus_client's parser)
    curl -s "$1/metrics" | python3 -c 'import sys; from fairbatch.bench.prometheus_text import samples
print(int(sum(s.value for s in samples(sys.stdin.read()) if s.name == "fairbatch:request_success_total")))'
}
for s in $SCALES; do
    a0=$(done_count http://127.0.0.1:8100); b0=$(done_count http://127.0.0.1:8101)
    $FB bench --base-url http://127.0.0.1:8200 --model "$MODEL" --trace azure-conv --num-prompts "$NUM" \
        --rate-scale "$s" --label "2x$POLICY+$ROUTER" --no-save-detailed --save-result "$OUT/cluster_x$s.json" \
        > "/tmp/fairbatch-bench_x$s.log" 2>&1 || echo "bench x$s failed"
    a1=$(done_count http://127.0.0.1:8100); b1=$(done_count http://127.0.0.1:8101)
    echo "x$s split $((a1 - a0))/$((b1 - b0))" | tee -a "$OUT/split.txt"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print(f"{'scale':>6s} {'rate':>6s} {'done':>5s} {'fail':>4s} {'ttft50':>7s} {'ttft99':>7s} {'tpot50':>6s} {'tpot99':>6s} {'att':>6s} {'goodput':>7s}")
for p in sorted(pathlib.Path(sys.argv[1]).glob("cluster_x*.json")):
    d = json.loads(p.read_text()); r = d["runs"][0] if "runs" in d else d
    print(f"{r['rate_scale']:6g} {r['request_rate']:6.2f} {r['completed']:5d} {r.get('failed', 0):4d} {r['median_ttft_ms']:7.0f} "
          f"{r['p99_ttft_ms']:7.0f} {r['median_tpot_ms']:6.1f} {r['p99_tpot_ms']:6.1f} {r['slo_attainment']:6.3f} {r['request_goodput']:7.2f}")
PY
