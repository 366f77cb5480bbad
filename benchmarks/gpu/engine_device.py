"""Everything the engine needs from a GPU session, in one process-frugal run:

1. the GPU tests (``pytest -m gpu tests/test_engine_gpu.py``) in a subprocess;
2. ``benchmarks/micro/engine_roofline.py`` (imported, in this process): ceilings, Triton
   attention tuning, step times vs roofline;
3. ``fairbatch profile`` for each model (dummy bf16 weights), with the tuned attention
   configs, writing ``{model}_{gpu}.json`` profiles and their raw samples.

Results go to ``$OUT`` (or ``--out``); a short table is printed last.

    OUT=/tmp/out PYTHONPATH=src python benchmarks/gpu/engine_device.py --models llama-3-8b qwen2.5-7b
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
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    t0 = time.time()

    if not args.skip_tests:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(["src", "tests", os.environ.get("PYTHONPATH", "")]))
        with open(out / "gpu_tests.log", "w") as log:
            rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  "tests/test_engine_gpu.py"], stdout=log, stderr=subprocess.STDOUT, env=env)
        tail = (out / "gpu_tests.log").read_text().strip().splitlines()[-1:]
        summary.append(f"gpu tests rc={rc}: {tail[0] if tail else ''}  ({time.time() - t0:.0f}s)")
        print(summary[-1], flush=True)

    import engine_roofline as er
    import torch

    from fairbatch.engine.attention import triton_paged as tp

    if not args.skip_bench:
        try:
            sys.argv = ["engine_roofline.py", "--out", str(out / "engine_roofline.json")] + (["--tune"] if args.tune else [])
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

    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n===== summary =====")
    print("\n".join(summary))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
