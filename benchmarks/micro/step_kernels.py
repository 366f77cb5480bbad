"""Where an engine step's time goes: GPU kernel time by kind, and the host's share.

For each step shape, ``torch.profiler`` (CUPTI) records ``--repeats`` executions of the
step exactly as the scheduler runs it (``EngineExecutor.execute``). Kernels are grouped
by what they do (``kernel_kind``): the linear layers' GEMMs, paged attention, the fused
norm / activation / rotary+cache-write kernels, logits and sampling, copies, and the
rest. Per step it reports the wall time (timed outside the profiler), the time the GPU
spent in kernels, the gap between them (host work and launch latency the GPU waited
for), each kind's milliseconds and kernel count, and what the GEMMs and attention
achieved against the measured ceilings. This is what tells the ways into issue #15
apart: launch-bound steps show a gap, kernel-bound ones a kind far from its ceiling.
Mixed steps are also timed with decode attention on a second stream beside the prefill
chunks' (``--attention-overlap``, off by default): ``wall_overlap_ms``; steps with prefill
chunks with those through torch's SDPA (``--prefill-attention sdpa``): ``wall_sdpa_prefill_ms``.

    PYTHONPATH=src python benchmarks/micro/step_kernels.py --out step_kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from collections import defaultdict

# the step shapes of issue #15's table that run eagerly in serving (steps over 256 tokens)
# and decodes (graphed in serving; eager here, so their kernels show)
CASES = [
    ("decode b=1 ctx=2048", [(2047, 1)]),
    ("decode b=32 ctx=2048", [(2047, 1)] * 32),
    ("decode b=128 ctx=2048", [(2047, 1)] * 128),
    ("prefill 128", [(0, 128)]),
    ("prefill 300", [(0, 300)]),
    ("prefill 512", [(0, 512)]),
    ("prefill 2048", [(0, 2048)]),
    ("mixed 128 dec@2048 + 512 chunk", [(2047, 1)] * 128 + [(0, 512)]),
    ("mixed 64 dec@1024 + 1024 chunk@2048", [(1023, 1)] * 64 + [(2048, 1024)]),
    ("mixed 32 dec@512 + 2048 chunk", [(511, 1)] * 32 + [(0, 2048)]),
]

# (kind, pattern) in order; the first match names the kernel. cuBLAS on Hopper names its
# GEMMs nvjet_* / sm90_xmma_gemm_*; cutlass and older cuBLAS say gemm; this engine's Triton
# kernels keep their Python names.
_KINDS = [
    ("attention", r"paged_attention|flash|attn"),
    ("gemm", r"nvjet|gemm|xmma|cutlass|matmul|splitk"),
    ("norm", r"rms_norm|layer_norm"),
    ("act", r"silu|gelu"),
    ("rope_kv", r"rope|rotary|reshape_and_cache|cache_kernel"),
    ("sampling", r"argmax|softmax|topk|top_k|sort|exponential|multinomial|sampl|log_softmax|max_kernel"),
    ("copy", r"memcpy|memset|copy|cat|index|gather|scatter|fill"),
]


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its (demangled) name."""
    low = name.lower()
    for kind, pattern in _KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_times(events, steps: int) -> dict[str, dict[str, float]]:
    """Group profiler events on the GPU by ``kernel_kind``: {kind: {"ms": per step, "count":
    per step}}. ``events`` are ``prof.key_averages()`` rows (or anything with ``key``,
    ``device_type``, ``self_device_time_total`` in us and ``count``)."""
    from torch.autograd import DeviceType

    out: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "count": 0.0})
    for e in events:
        if e.device_type != DeviceType.CUDA or e.self_device_time_total <= 0:
            continue
        row = out[kernel_kind(e.key)]
        row["ms"] += e.self_device_time_total / 1e3 / steps
        row["count"] += e.count / steps
    return dict(out)


def breakdown(engine, comp, repeats: int, bw: float, flops_rate: float, spec) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine_roofline import roofline
    from fairbatch.engine.profile import synthetic_step
    from fairbatch.plan import attention_pairs

    ex = engine.executor
    mixed = any(k == 1 for _, k in comp) and any(k > 1 for _, k in comp)
    with synthetic_step(engine, comp) as plan:
        for _ in range(2):
            ex.execute(plan)
        wall = statistics.median(ex.execute(plan).duration for _ in range(repeats)) * 1e3
        def wall_with(option: str, value) -> float:
            saved = getattr(engine.backend, option)
            setattr(engine.backend, option, value)
            try:
                ex.execute(plan)
                return statistics.median(ex.execute(plan).duration for _ in range(repeats)) * 1e3
            finally:
                setattr(engine.backend, option, saved)

        # the same step with decode attention on a second stream (--attention-overlap), and
        # with prefill chunks through torch's SDPA (--prefill-attention sdpa)
        wall_overlap = wall_with("overlap", True) if mixed else None
        wall_sdpa = wall_with("prefill", "sdpa") if any(k > 1 for _, k in comp) else None
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                ex.execute(plan)
            torch.cuda.synchronize()
    kinds = kernel_times(prof.key_averages(), repeats)
    busy = sum(k["ms"] for k in kinds.values())
    new = sum(k for _, k in comp)
    lin_flops = new * spec.layer_flops_per_token + len(comp) * spec.lm_head_flops_per_token
    pairs = sum(attention_pairs(c, k) for c, k in comp)
    kv_bytes = sum(c + k for c, k in comp) * spec.kv_bytes_per_token
    _, _, roof, phase = roofline(spec, comp, bw, flops_rate)
    row = {"wall_ms": wall, "wall_overlap_ms": wall_overlap, "wall_sdpa_prefill_ms": wall_sdpa, "gpu_busy_ms": busy, "host_gap_ms": wall - busy, "kinds": kinds,
           "roofline_ms": roof * 1e3, "phase_roofline_ms": phase * 1e3,
           "kernels_per_step": sum(k["count"] for k in kinds.values())}
    if kinds.get("gemm", {}).get("ms"):
        g = kinds["gemm"]["ms"] / 1e3
        row["gemm_TFLOPs"] = lin_flops / g / 1e12
        row["gemm_floor_ms"] = max(lin_flops / flops_rate, spec.streamed_weight_bytes / bw) * 1e3
    if kinds.get("attention", {}).get("ms"):
        a = kinds["attention"]["ms"] / 1e3
        row["attention_TBps"] = kv_bytes / a / 1e12
        row["attention_TFLOPs"] = pairs * spec.attn_flops_per_pair / a / 1e12
        row["attention_floor_ms"] = max(pairs * spec.attn_flops_per_pair / flops_rate, kv_bytes / bw) * 1e3
    return row


def format_row(name: str, row: dict) -> str:
    k = row["kinds"]
    parts = " ".join(f"{kind} {k[kind]['ms']:.2f}" for kind in sorted(k, key=lambda x: -k[x]["ms"]))
    extra = ""
    if "gemm_TFLOPs" in row:
        extra += f" | gemm {row['gemm_TFLOPs']:.0f} TFLOP/s (floor {row['gemm_floor_ms']:.2f})"
    if "attention_TBps" in row:
        extra += (f" | attn {row['attention_TBps']:.2f} TB/s {row['attention_TFLOPs']:.0f} TFLOP/s "
                  f"(floor {row['attention_floor_ms']:.2f})")
    if row.get("wall_overlap_ms"):
        extra += f" | overlapped attention: wall {row['wall_overlap_ms']:.2f}"
    if row.get("wall_sdpa_prefill_ms"):
        extra += f" | SDPA prefill: wall {row['wall_sdpa_prefill_ms']:.2f}"
    return (f"{name:38s} wall {row['wall_ms']:6.2f} gpu {row['gpu_busy_ms']:6.2f} gap {row['host_gap_ms']:5.2f} "
            f"({row['kernels_per_step']:.0f} kernels) roof {row['roofline_ms']:.2f}/{row['phase_roofline_ms']:.2f}: "
            f"{parts}{extra}")


def run(model: str, repeats: int, graphs: bool = False) -> dict:
    """Breakdowns of every case on a fresh dummy-weight engine (eager unless ``graphs``)."""
    import torch

    from engine_roofline import measure_ceilings
    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.specs import get_model

    bw, fl = measure_ceilings()
    engine = Engine(EngineArgs(model, load_format="dummy", dtype="bfloat16", max_num_seqs=256))
    engine.kv.data.normal_()
    saved = engine.executor.graphs
    if not graphs:
        engine.executor.graphs = None
    spec = get_model(model)
    rows, lines = [], []
    try:
        for name, comp in CASES:
            row = {"case": name, **breakdown(engine, comp, repeats, bw, fl, spec)}
            rows.append(row)
            lines.append(format_row(name, row))
            print(lines[-1], flush=True)
    finally:
        engine.executor.graphs = saved
    return {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "model": model,
            "torch": torch.__version__, "copy_bw_Bps": bw, "matmul_flops": fl,
            "mode": "graphs where they apply" if graphs else "eager", "rows": rows, "lines": lines}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--graphs", action="store_true", help="replay whole-step CUDA graphs where they apply")
    ap.add_argument("--out", default="step_kernels.json")
    args = ap.parse_args()
    result = run(args.model, args.repeats, args.graphs)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
