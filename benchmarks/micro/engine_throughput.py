"""Offline engine throughput on the Azure conversation trace: the first N requests, all
arriving at once, token-id prompts of the trace's lengths, exactly the trace's output
lengths (ignore_eos), one policy. Reports output tokens/s against the roofline of the
same work: the sum, over the steps the engine actually ran, of each step's roofline time
(weights + KV bytes over the copy rate vs FLOPs over the matmul rate; RooflineLatencyModel).

    PYTHONPATH=src python benchmarks/micro/engine_throughput.py --num-requests 2000 [--policy vllm] [--async-scheduling]

With ``--async-scheduling`` each step is planned while the last one runs (step_ahead.py);
"steps s" then sums each step from its launch to its collection.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fairbatch.engine.llm import LLM
from fairbatch.engine.params import SamplingParams
from fairbatch.latency.roofline import RooflineLatencyModel
from fairbatch.specs import get_gpu, get_model
from fairbatch.workload import load_trace, truncate_to_context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--policy", default="vllm")
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--async-scheduling", action="store_true", help="plan each step while the last one runs")
    ap.add_argument("--out", type=Path, help="also write the numbers here (JSON)")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", policy=args.policy, async_scheduling=args.async_scheduling)
    entries, _ = truncate_to_context(load_trace("azure-conv", num_requests=args.num_requests),
                                     llm.scheduler_config.max_model_len)
    vocab = llm.engine.config.vocab_size
    prompts = [[10 + (i * 31 + j) % min(1000, vocab - 10) for j in range(e.prompt_len)] for i, e in enumerate(entries)]
    params = [SamplingParams(max_tokens=e.output_len, ignore_eos=True, temperature=0.0) for e in entries]
    llm.generate(prompts[:8], [SamplingParams(max_tokens=4, ignore_eos=True)] * 8)   # warm-up: JIT, caches

    roof = RooflineLatencyModel(get_model(args.model), get_gpu(args.gpu))
    ex = llm.engine.executor
    prepare, collect = ex.prepare, ex.collect
    acc = {"roof": 0.0, "step": 0.0, "steps": 0}

    def prepared(plan):   # every step is prepared once, planned ahead or not
        acc["roof"] += roof.predict(plan.features)
        return prepare(plan)

    def collected(launched):
        res = collect(launched)
        acc["step"] += res.duration
        acc["steps"] += 1
        return res

    ex.prepare, ex.collect = prepared, collected
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(e.prompt_len for e in entries)
    assert all(len(o.token_ids) == e.output_len for o, e in zip(outs, entries))
    print(f"{args.model} dummy, policy {args.policy}{', async scheduling' if args.async_scheduling else ''}, "
          f"{len(entries)} requests, {in_tokens} prompt + "
          f"{out_tokens} output tokens, {acc['steps']} steps")
    print(f"{'wall s':>8s} {'steps s':>8s} {'roofline s':>10s} {'out tok/s':>10s} {'roofline tok/s':>14s} {'ratio':>6s}")
    print(f"{wall:8.1f} {acc['step']:8.1f} {acc['roof']:10.1f} {out_tokens / wall:10.0f} "
          f"{out_tokens / acc['roof']:14.0f} {wall / acc['roof']:6.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "model": args.model, "policy": args.policy, "async_scheduling": args.async_scheduling,
            "requests": len(entries), "prompt_tokens": in_tokens, "output_tokens": out_tokens, "steps": acc["steps"],
            "wall_s": wall, "steps_s": acc["step"], "roofline_s": acc["roof"], "output_tokens_per_s": out_tokens / wall,
            "wall_over_roofline": wall / acc["roof"]}, indent=1))


if __name__ == "__main__":
    main()
