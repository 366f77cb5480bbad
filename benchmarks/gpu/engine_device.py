"""Everything the engine needs from a GPU session, in one process-frugal run:

1. the GPU tests (``pytest -m gpu``: engine, piecewise graphs, prefix cache, async scheduling,
   sampling) in a subprocess;
2. ``benchmarks/micro/engine_roofline.py`` (imported, in this process): ceilings, Triton
   attention tuning, step times vs roofline;
3. ``fairbatch profile`` for each model (dummy bf16 weights), with the tuned attention
   configs, writing ``{model}_{gpu}.json`` profiles and their raw samples;
4. with ``--piecewise MODEL``: issue #15's step times with piecewise CUDA graphs on and
   off (``piecewise_rows``), what their capture cost in GPU memory, and the step-time
   curve over chunk sizes 64-2,048 (eager and piecewise);
5. with ``--kernels MODEL``: ``benchmarks/micro/prefill_attention.py`` (ours vs torch's SDPA
   backends, ``prefill_attention.json``), ``benchmarks/micro/gemm_shapes.py`` (a layer's
   GEMMs at 64-2,048 rows, ``gemm_shapes.json``), ``benchmarks/micro/split_kv.py`` (split-KV decode attention
   at each setting, ``split_kv.json``) and ``benchmarks/micro/step_kernels.py`` (each step
   shape's GPU kernel time by kind and the host gap, ``step_kernels.json``), imported;
6. with ``--throughput MODEL``: ``benchmarks/micro/engine_throughput.py`` (offline, the first
   ``--throughput-requests`` conversation requests at once) with the plain loop and with
   scheduling one step ahead, alternated over ``--throughput-rounds`` (subprocesses,
   ``throughput_*.json``).

Results go to ``$OUT`` (or ``--out``); a short table is printed last.

    OUT=/tmp/out PYTHONPATH=src python benchmarks/gpu/engine_device.py --models llama-3-8b qwen2.5-7b
    OUT=/tmp/out PYTHONPATH=src python benchmarks/gpu/engine_device.py --skip-bench --models --piecewise llama-3-8b
    OUT=/tmp/out PYTHONPATH=src python benchmarks/gpu/engine_device.py --skip-tests --skip-bench --models --kernels llama-3-8b
    OUT=/tmp/out PYTHONPATH=src python benchmarks/gpu/engine_device.py --skip-tests --skip-bench --models --throughput llama-3-8b
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

# engine_roofline runs in this process (one CUDA context; --tune's attention configs are
# then the ones the profiles below use), imported from its folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "micro"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "engine-device-out"))
    ap.add_argument("--models", nargs="*", default=["llama-3-8b", "qwen2.5-7b"])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--piecewise", metavar="MODEL", help="time piecewise CUDA graphs on vs off for MODEL")
    ap.add_argument("--kernels", metavar="MODEL", help="GPU kernel time by kind per step shape for MODEL")
    ap.add_argument("--throughput", metavar="MODEL", help="offline throughput of MODEL, plain vs one step ahead")
    ap.add_argument("--throughput-requests", type=int, default=600)
    ap.add_argument("--throughput-rounds", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    t0 = time.time()

    if not args.skip_tests:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(["src", "tests", os.environ.get("PYTHONPATH", "")]))
        with open(out / "gpu_tests.log", "w") as log:
            rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  "tests/test_engine_gpu.py", "tests/test_piecewise_graph_gpu.py",
                                  "tests/test_engine_prefix_cache.py", "tests/test_async_scheduling.py",
                                  "tests/test_sampling.py"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        tail = (out / "gpu_tests.log").read_text().strip().splitlines()[-1:]
        summary.append(f"gpu tests rc={rc}: {tail[0] if tail else ''}  ({time.time() - t0:.0f}s)")
        print(summary[-1], flush=True)

    import engine_roofline as er
    import torch

    from fairbatch.engine.attention import triton_paged as tp

    if not args.skip_bench:
        try:
            sys.argv = (["engine_roofline.py", "--out", str(out / "engine_roofline.json"), "--overlap"]
                        + (["--tune"] if args.tune else []))
            er.main()
            res = json.loads((out / "engine_roofline.json").read_text())
            summary.append(f"copy {res['copy_bw_Bps'] / 1e12:.2f} TB/s, matmul {res['matmul_flops'] / 1e12:.0f} TFLOP/s; "
                           f"attention decode {res['decode_config']} prefill {res['prefill_config']}")
            for r in res["rows"]:
                if "ms" in r:
                    summary.append(f"{r['case']:36s} {r['mode']:5s} {r['ms']:7.2f} ms roof {r['roofline_ms']:7.2f} "
                                   f"x{r['ratio']:.2f} phase x{r['phase_ratio']:.2f} {r['achieved_TBps']:.2f} TB/s "
                                   f"{r['achieved_TFLOPs']:4.0f} TFLOP/s ({r['frac_of_matmul_rate']:.0%})")
        except Exception:
            traceback.print_exc()
            summary.append("bench FAILED: " + traceback.format_exc().strip().splitlines()[-1])
        gc.collect()
        torch.cuda.empty_cache()

    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.engine.profile import profile

    for name in args.models:
        t = time.time()
        try:
            engine = Engine(EngineArgs(name, load_format="dummy", dtype="bfloat16", max_num_seqs=256))
            lat, samples, rep = profile(engine, quick=args.quick_profile, repeats=3)
            lat.meta["attention_configs"] = {"decode": dict(tp.DECODE_CONFIG), "prefill": dict(tp.PREFILL_CONFIG)}
            gpu = lat.meta["gpu"]
            lat.save(out / f"{name}_{gpu}.json")
            (out / f"{name}_{gpu}_samples.json").write_text(json.dumps([s.to_dict() for s in samples]))
            co = lat.to_dict()["coefficients"]
            summary.append(f"profile {name}: {len(samples)} samples, held-out median {rep['holdout_median_rel_err']:.1%} "
                           f"p95 {rep['holdout_p95_rel_err']:.1%} max {rep['holdout_max_rel_err']:.1%}; "
                           + ", ".join(f"{k}={v:.3g}" for k, v in co.items()) + f" ({time.time() - t:.0f}s)")
            del engine
        except Exception:
            traceback.print_exc()
            summary.append(f"profile {name} FAILED: " + traceback.format_exc().strip().splitlines()[-1])
        gc.collect()
        torch.cuda.empty_cache()
        print(summary[-1], flush=True)

    if args.piecewise:
        try:
            summary.extend(piecewise_rows(args.piecewise, out))
        except Exception:
            traceback.print_exc()
            summary.append("piecewise FAILED: " + traceback.format_exc().strip().splitlines()[-1])

    if args.kernels:
        summary.extend(kernel_rows(args.kernels, out))

    if args.throughput:
        summary.extend(throughput_rows(args.throughput, out, args.throughput_requests, args.throughput_rounds))

    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n===== summary =====")
    print("\n".join(summary))
    print(f"total {time.time() - t0:.0f}s")


def kernel_rows(model: str, out: Path) -> list[str]:
    """Issue #15's kernel measurements, each on its own (one failing does not lose the
    others): prefill attention vs torch's SDPA, GEMMs by row count, the split-KV sweep,
    and each step shape's kernel time by kind. Writes their JSON; returns summary lines."""
    import torch

    import gemm_shapes
    import prefill_attention
    import split_kv
    import step_kernels

    def prefill() -> list[str]:
        rows = prefill_attention.sweep()
        (out / "prefill_attention.json").write_text(json.dumps(rows, indent=1))
        return [f"prefill attention {r['tokens']} tokens, TFLOP/s: "
                + ", ".join(f"{k} {v:.0f}" for k, v in r["TFLOPs"].items() if v) for r in rows]

    def gemms() -> list[str]:
        rows = gemm_shapes.sweep()
        (out / "gemm_shapes.json").write_text(json.dumps(rows, indent=1))
        return [f"gemm M={r['rows']}: {r['ms'] * 1e3:.0f} us {r['TFLOPs']:.0f} TFLOP/s, padded to "
                f"{r['padded_rows']}: {r['padded_ms'] * 1e3:.0f} us" for r in rows]

    def splits() -> list[str]:
        rows = split_kv.sweep()
        (out / "split_kv.json").write_text(json.dumps(rows, indent=1))
        return [f"split-kv b={r['batch']} ctx={r['context']}: "
                + " ".join(f"{s}:{ms * 1e3:.0f}us/{r['splits'][s]}" for s, ms in r["ms"].items()) for r in rows]

    def steps() -> list[str]:
        res = step_kernels.run(model, repeats=5)
        (out / "step_kernels.json").write_text(json.dumps(res, indent=1))
        return res["lines"]

    lines: list[str] = []
    for name, part in (("prefill attention", prefill), ("gemm shapes", gemms), ("split-kv", splits),
                       ("step kernels", steps)):
        try:
            lines.extend(part())
        except Exception:
            traceback.print_exc()
            lines.append(f"{name} FAILED: " + traceback.format_exc().strip().splitlines()[-1])
        gc.collect()
        torch.cuda.empty_cache()
    return lines


def throughput_rows(model: str, out: Path, requests: int, rounds: int) -> list[str]:
    """engine_throughput.py with the plain loop and one step ahead, alternated, each in a
    process of its own (a fresh CUDA context and graphs). Returns summary lines."""
    script = Path(__file__).resolve().parents[1] / "micro" / "engine_throughput.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")]))
    lines = []
    for rnd in range(rounds):
        for ahead in (False, True) if rnd % 2 == 0 else (True, False):
            tag = f"{'async' if ahead else 'plain'}_r{rnd}"
            path = out / f"throughput_{tag}.json"
            with open(out / f"throughput_{tag}.log", "w") as log:
                rc = subprocess.call([sys.executable, str(script), "--model", model, "--num-requests", str(requests),
                                      "--out", str(path), *(["--async-scheduling"] if ahead else [])],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
            if rc != 0 or not path.exists():
                lines.append(f"throughput {tag} FAILED rc={rc} (throughput_{tag}.log)")
                continue
            r = json.loads(path.read_text())
            lines.append(f"throughput {tag}: {r['output_tokens_per_s']:.0f} out tok/s, wall {r['wall_s']:.1f} s, "
                         f"x{r['wall_over_roofline']:.2f} roofline, {r['steps']} steps")
            print(lines[-1], flush=True)
    return lines


# (context, new tokens) per sequence: issue #15's rows, and steps at and around the buckets
PIECEWISE_CASES = (
    ("mixed 128 dec@2048 + 512 chunk", [(2047, 1)] * 128 + [(0, 512)]),
    ("mixed 64 dec@1024 + 1024 chunk@2048", [(1023, 1)] * 64 + [(2048, 1024)]),
    ("mixed 32 dec@512 + 2016 chunk", [(511, 1)] * 32 + [(0, 2016)]),
    ("prefill 128", [(0, 128)]),
    ("prefill 300", [(0, 300)]),
    ("prefill 512", [(0, 512)]),
    ("prefill 1024", [(0, 1024)]),
    ("prefill 2048", [(0, 2048)]),
)


def piecewise_rows(model: str, out: Path, repeats: int = 10) -> list[str]:
    """Median step ms of each case in four modes: eager; whole-step graphs (today's
    default); whole-step then piecewise graphs (--piecewise-cuda-graphs); piecewise alone.
    Writes piecewise.json; returns summary lines."""
    import torch

    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.engine.piecewise_graph import (
        CudaGraphPieces,
        PiecewiseGraphs,
        piecewise_buckets,
        piecewise_memory_bytes,
    )
    from fairbatch.engine.profile import measure

    engine = Engine(EngineArgs(model, load_format="dummy", dtype="bfloat16", max_num_seqs=256))
    engine.kv.data.normal_()
    ex = engine.executor
    buckets = piecewise_buckets(engine.args.max_num_batched_tokens)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    t = time.time()
    # what Engine does with piecewise_cuda_graphs=True, after the KV cache took its share
    pw = PiecewiseGraphs(engine.model, engine.kv, engine.backend, engine.ops, buckets, CudaGraphPieces(engine.device))
    pw.capture_all()
    torch.cuda.synchronize()
    cost = torch.cuda.memory_reserved() - reserved
    estimate = piecewise_memory_bytes(engine.config.spec, buckets[-1])
    lines = [f"piecewise {model}: buckets {buckets}, capture {time.time() - t:.1f}s, {cost / 2**20:.0f} MiB reserved "
             f"(estimate {estimate / 2**20:.0f} MiB), {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free"]
    whole = ex.graphs
    modes = {"eager": (None, None), "whole": (whole, None), "whole+piecewise": (whole, pw), "piecewise": (None, pw)}
    rows = []
    for name, comp in PIECEWISE_CASES:
        row = {"case": name, "tokens": sum(k for _, k in comp)}
        for mode, (graphs, piecewise) in modes.items():
            ex.graphs, ex.piecewise = graphs, piecewise
            before = pw.replays
            row[mode] = measure(engine, comp, repeats=repeats) * 1e3
            row[mode + "_ran_piecewise"] = pw.replays > before
        ex.graphs, ex.piecewise = whole, None
        rows.append(row)
        lines.append(f"{name:38s} " + "  ".join(f"{m} {row[m]:6.2f}{'*' if row[m + '_ran_piecewise'] else ''}"
                                                 for m in modes) + " ms")
        print(lines[-1], flush=True)
    # the step-time curve over prompt chunk sizes (the step-shape lead of issue #12: is it
    # monotone, where are the tile steps), alone and beside 64 decodes, eager and piecewise
    curve = []
    for k in range(64, 2049, 64):
        point = {"tokens": k}
        for shape, comp in (("prefill", [(0, k)]), ("with_64_decodes", [(1023, 1)] * 64 + [(0, k)])):
            for mode, (graphs, piecewise) in (("eager", (None, None)), ("piecewise", (None, pw))):
                ex.graphs, ex.piecewise = graphs, piecewise
                point[f"{shape}_{mode}"] = measure(engine, comp, repeats=5) * 1e3
        curve.append(point)
    ex.graphs, ex.piecewise = whole, None
    lines.append("curve ms (k: prefill eager/piecewise, +64 decodes eager/piecewise): " + "; ".join(
        f"{p['tokens']}: {p['prefill_eager']:.1f}/{p['prefill_piecewise']:.1f}, "
        f"{p['with_64_decodes_eager']:.1f}/{p['with_64_decodes_piecewise']:.1f}" for p in curve))
    (out / "piecewise.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "model": model, "buckets": buckets, "capture_reserved_bytes": cost,
        "rows": rows, "curve": curve, "note": "* = the piecewise graphs ran"}, indent=1))
    del engine, pw
    return lines


if __name__ == "__main__":
    main()
