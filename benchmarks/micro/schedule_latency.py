"""Cost of one ``schedule()`` call with N running requests, KV block allocation included.
Target (docs/PERFORMANCE.md): < 200 us at N = 512 (vLLM 0.32's V1 scheduler: ~3.7 ms).

Each measured step has N running decodes at ragged contexts plus a few waiting prompts;
``on_step_end`` runs between calls (not timed) so the state stays realistic, including
decodes crossing block boundaries.

``--prefix-caching``: the caching allocator, every prompt opening with one of 8 shared
prefixes of 0-1,536 tokens (docs/PREFIX_CACHING.md).

    python benchmarks/micro/schedule_latency.py [--running 128 512 1024] [--steps 2000] [--prefix-caching]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

from fairbatch.kv import BlockAllocator, trace_block_hashes
from fairbatch.latency import load_latency_model
from fairbatch.plan import StepResult
from fairbatch.request import SLO, Request
from fairbatch.scheduler import SchedulerConfig, make_scheduler


def _use_config(sched, old: SchedulerConfig, new: SchedulerConfig) -> None:
    """Point the scheduler, and each part of it that holds the (frozen) config, at ``new``:
    the warm-up's relaxed limits, then the measured ones."""
    sched.config = new
    for part in vars(sched).values():
        if getattr(part, "config", None) is old:
            part.config = new


def _name(req: Request, rng: random.Random) -> Request:
    """One of 8 shared prefixes (0-3 blocks of 512 tokens), then the request's own blocks."""
    shared = rng.randrange(8)
    ids = [1000 * shared + j for j in range(shared % 4)] + [10**6 + 100 * rng.randrange(10**6) + j for j in range(8)]
    req.block_hashes = trace_block_hashes(ids, req.prompt_len, 16)
    return req


def bench(policy: str, n_running: int, steps: int, seed: int = 0, prefix_caching: bool = False) -> list[float]:
    rng = random.Random(seed)
    model = load_latency_model("llama-3-8b", "h100")
    cfg = SchedulerConfig(max_num_seqs=max(1024, n_running + 64), max_model_len=8192)
    alloc = BlockAllocator(200_000, 16, prefix_caching=prefix_caching)
    sched = make_scheduler(policy, cfg, alloc, model)
    name = _name if prefix_caching else (lambda r, _: r)
    now = 0.0
    for i in range(n_running):   # already-running decodes: ragged contexts, varied slack
        # A generous TTFT: the untimed warm-up prefills them one after another, and none
        # should count as having missed its SLO (that would move it to the best-effort group).
        r = Request(f"run-{i}", now, rng.randint(64, 3000), 100_000,
                    SLO(600.0, rng.choice([0.03, 0.05, 0.1])))
        sched.add(name(r, rng), now)
    # Prefill them all (untimed), until every request is decoding. Time-budget policies
    # (fairbatching, qoserve) admit no prompt while the decodes alone fill the step, so
    # for the warm-up only their steps may be as long as they allow.
    warm = replace(cfg, time_budget_min=cfg.time_budget_max, qoserve_min_step_tokens=cfg.qoserve_max_step_tokens)
    _use_config(sched, cfg, warm)
    while any(r.generated == 0 for r in sched.running) or sched.num_waiting:
        plan = sched.schedule(now)
        now += model.predict(plan.features)
        sched.on_step_end(plan, StepResult(0.0), now)
    _use_config(sched, warm, cfg)
    assert len(sched.running) == n_running, (policy, len(sched.running))
    times = []
    for s in range(steps):
        if s % 50 == 0:   # a trickle of new prompts keeps the prefill path exercised
            sched.add(name(Request(f"new-{s}", now, rng.randint(100, 2000), 100_000, SLO(1.0, 0.05)), rng), now)
        t0 = time.thread_time()   # CPU time of this thread: robust to a busy machine
        plan = sched.schedule(now)
        times.append(time.thread_time() - t0)
        now += model.predict(plan.features)
        sched.on_step_end(plan, StepResult(0.0), now)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--running", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--policy", action="append")
    ap.add_argument("--prefix-caching", action="store_true")
    args = ap.parse_args()
    print(f"{'policy':14s} {'running':>8s} {'median us':>10s} {'p90 us':>8s} {'mean us':>8s}")
    for p in args.policy or ["vllm", "vllm-priority", "sarathi", "fairbatching", "qoserve"]:
        for n in args.running:
            t = sorted(bench(p, n, args.steps, prefix_caching=args.prefix_caching))
            print(f"{p:14s} {n:8d} {statistics.median(t) * 1e6:10.0f} {t[int(0.9 * len(t))] * 1e6:8.0f} "
                  f"{statistics.fmean(t) * 1e6:8.0f}")


if __name__ == "__main__":
    main()
