"""Measure real step times over a sweep of batch compositions and fit the step-time
model the schedulers and the simulator use (``LinearLatencyModel``).

Every sample is one ``EngineExecutor.execute`` of a synthetic ``StepPlan`` (decodes,
prefill chunks over various cached contexts, and mixes of both), timed exactly as a
serving step is (host batch building, forward, sampling, device sync); its features are
the plan's ``StepFeatures``. A random quarter of the samples is held out, and the fit
error on it is what the profile reports.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fairbatch.engine.llm import Engine
from fairbatch.latency.linear import LinearLatencyModel
from fairbatch.plan import StepFeatures, StepPlan
from fairbatch.request import SLO, Request

Composition = list[tuple[int, int]]   # (cached tokens, new tokens) per sequence


@dataclass
class Sample:
    features: StepFeatures
    seconds: float
    kind: str
    composition: str

    def to_dict(self) -> dict:
        f = self.features
        return {"kind": self.kind, "composition": self.composition, "seconds": self.seconds,
                "num_seqs": f.num_seqs, "new_tokens": f.new_tokens, "context_tokens": f.context_tokens,
                "attention_pairs": f.attention_pairs}


def sweep(max_tokens: int, capacity_tokens: int, max_seqs: int, max_model_len: int, quick: bool = False,
          seed: int = 0) -> list[tuple[str, Composition]]:
    """Batch compositions to time: decode grids, prefill chunks over cached contexts,
    mixes, and random compositions (which make the held-out set representative)."""
    rng = random.Random(seed)
    pts: list[tuple[str, Composition]] = []
    # quick: a small smoke sweep (CPU, CI); the full one is sized for a GPU serving 8k tokens
    batches = [1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256]
    ctxs = [64, 256] if quick else [128, 512, 1024, 2048, 4096]
    for b in batches:
        for c in ctxs:
            pts.append(("decode", [(c - 1, 1)] * b))
    chunks = [16, 64, 256, 512] if quick else [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    for k in chunks:
        for c in ([0, 256] if quick else [0, 1024, 4096]):
            pts.append(("prefill", [(c, k)]))
    for nd in ([4, 16] if quick else [8, 32, 128, 256]):
        for dc in ([256] if quick else [512, 2048]):
            for k in ([64, 256] if quick else [128, 512, 1024, 2048]):
                pts.append(("mixed", [(dc - 1, 1)] * nd + [(rng.choice([0, 256 if quick else 1024]), k)]))
    top = 512 if quick else 4096
    for _ in range(10 if quick else 60):
        comp: Composition = [(rng.randint(16, top) - 1, 1)
                             for _ in range(rng.choice([0, 1, 8, 32] if quick else [0, 1, 8, 32, 64, 128, 200]))]
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            comp.append((rng.choice([0, 0, top // 8, top // 2]), rng.choice([32, 128, 300, 512, 1000, 2048])))
        if comp:
            pts.append(("random", comp))
    ok = []
    for kind, comp in pts:
        tokens = sum(k for _, k in comp)
        ctx = sum(-(-(c + k) // 16) * 16 for c, k in comp)
        longest = max(c + k for c, k in comp)
        if tokens <= max_tokens and ctx <= capacity_tokens and len(comp) <= max_seqs and longest <= max_model_len:
            ok.append((kind, comp))
    return ok


def _describe(comp: Composition) -> str:
    dec = [c + 1 for c, k in comp if k == 1]
    pre = [(c, k) for c, k in comp if k > 1]
    parts = []
    if dec:
        parts.append(f"{len(dec)} decodes (ctx mean {int(np.mean(dec))})")
    parts += [f"chunk {k} @ {c}" for c, k in pre]
    return ", ".join(parts)


@torch.inference_mode()
@contextlib.contextmanager
def synthetic_step(engine: Engine, comp: Composition, seed: int = 0) -> Iterator[StepPlan]:
    """A ``StepPlan`` of one step of composition ``comp`` over random prompt tokens, its KV
    blocks allocated for the duration (released on exit). Anything that times or inspects
    one step shape (``measure``, ``benchmarks/micro/step_kernels.py``) runs inside it."""
    alloc = engine.allocator
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size
    plan = StepPlan()
    reqs = []
    try:
        for i, (c, k) in enumerate(comp):
            ids = rng.integers(0, vocab, size=c + k).tolist()
            req = Request(f"p{i}", 0.0, c + k, 1, SLO(1.0, 1.0), prompt_token_ids=ids)
            req.num_computed = c
            if not alloc.allocate(req.request_id, c + k):
                raise ValueError("composition does not fit the KV cache")
            reqs.append(req)
            plan.add(req, k)
        yield plan
    finally:
        for r in reqs:
            engine.executor.release(r)
            alloc.free(r.request_id)


def measure(engine: Engine, comp: Composition, repeats: int = 3, seed: int = 0) -> float:
    """Median seconds of ``repeats`` executions of one synthetic step (after one warm-up)."""
    with synthetic_step(engine, comp, seed) as plan:
        ex = engine.executor
        ex.execute(plan)
        return statistics.median(ex.execute(plan).duration for _ in range(repeats))


def profile(engine: Engine, *, quick: bool = False, repeats: int = 3, seed: int = 0,
            holdout: float = 0.25, on_sample: Callable[[int, int, Sample], None] | None = None,
            ) -> tuple[LinearLatencyModel, list[Sample], dict]:
    """Sweep, fit on the training split, report the error on the held-out split."""
    if engine.device.type == "cuda":
        engine.kv.data.normal_()       # time over realistic KV values, not zeros
    args = engine.args
    cap = engine.allocator.num_blocks * engine.allocator.block_size
    points = sweep(args.max_num_batched_tokens, cap, args.max_num_seqs, engine.max_model_len, quick=quick, seed=seed)
    if len(points) < 10:
        raise ValueError(f"only {len(points)} step compositions fit this engine's limits; raise --num-kv-blocks "
                         f"or --max-num-batched-tokens")
    samples: list[Sample] = []
    for i, (kind, comp) in enumerate(points):
        plan_feats = StepFeatures()
        for c, k in comp:
            plan_feats.add(c, k)
        s = Sample(plan_feats, measure(engine, comp, repeats, seed + i), kind, _describe(comp))
        samples.append(s)
        if on_sample is not None:
            on_sample(i, len(points), s)
    rng = random.Random(seed)
    idx = list(range(len(samples)))
    rng.shuffle(idx)
    n_test = max(1, int(len(idx) * holdout))
    test = [samples[i] for i in idx[:n_test]]
    train = [samples[i] for i in idx[n_test:]]
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    meta = {
        "model": engine.name, "gpu": engine.gpu_name if engine.device.type == "cuda" else "cpu",
        "device": device, "dtype": str(engine.dtype).replace("torch.", ""),
        "attention_backend": engine.backend.name, "cuda_graphs": engine.executor.graphs is not None,
        "date": _dt.date.today().isoformat(), "torch": torch.__version__,
        "source": "fairbatch profile (measured engine steps)",
    }
    model = LinearLatencyModel.fit([(s.features, s.seconds) for s in train], meta=meta)
    err = model.relative_errors([(s.features, s.seconds) for s in test])
    report = {"num_train": len(train), "num_test": len(test),
              "holdout_median_rel_err": float(np.median(err)), "holdout_p95_rel_err": float(np.percentile(err, 95)),
              "holdout_max_rel_err": float(err.max())}
    model.meta.update(report)
    return model, samples, report
