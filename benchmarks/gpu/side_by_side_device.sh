#!/usr/bin/env bash
# On a 2-GPU machine: two `fairbatch serve` + `fairbatch bench` runs side by side, one per
# GPU, on the same requests and loads (benchmarks/gpu/serve_bench_device.py each), so that two
# policies are compared in one device call. Each side is "LABEL POLICY [serve args...]".
#
#   bash benchmarks/gpu/side_by_side_device.sh "fb fairbatching" "sarathi1536 sarathi --set chunk_size=1536" \
#        -- --trace azure-code --num 800 --scales 1.0 --probes 0 --budget-s 540
#
# Writes $OUT/<label>/{summary_*.json,serve_*.log,profile_*.json} and $OUT/<label>.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
a=$1; b=$2; shift 2; [ "${1:-}" = "--" ] && shift
out=${OUT:-/tmp/side-by-side}
run_side() {   # gpu "label policy args..." bench-args...
    local gpu=$1; read -r -a side <<<"$2"; shift 2
    local label=${side[0]} policy=${side[1]} serve=()
    for x in "${side[@]:2}"; do serve+=("--serve-arg=$x"); done
    mkdir -p "$out/$label"
    CUDA_VISIBLE_DEVICES=$gpu PYTHONUNBUFFERED=1 python3 benchmarks/gpu/serve_bench_device.py --policy "$policy" \
        --out "$out/$label" --work "/tmp/work-$label" --port $((8100 + 100 * gpu)) "${serve[@]}" "$@" \
        >"$out/$label.log" 2>&1
}
run_side 0 "$a" "$@" & pa=$!
run_side 1 "$b" "$@" & pb=$!
wait $pa $pb
for s in "$a" "$b"; do read -r label _ <<<"$s"; echo "== $label"; tail -4 "$out/$label.log"; done
