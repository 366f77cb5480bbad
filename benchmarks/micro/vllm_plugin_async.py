"""The vLLM plugin's sync and async variants, and vLLM's own schedulers, driven directly
with a simulated model (no forward pass): steps to finish a ragged batch, the median
``schedule()`` time, and whether the output tokens are the same. CPU only: what async
scheduling buys on a GPU (overlapping ``schedule()`` with the forward pass) is not here.

    ~/.cache/fairbatch/vllm-venv/bin/python benchmarks/micro/vllm_plugin_async.py [--requests 160]

``async/in-flight 2``: one step executing while the next is scheduled (vLLM's async
engine); ``in-flight 1``: each step's output is applied before the next is scheduled.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support import TINY_LLAMA_CONFIG  # noqa: E402


def _factory(model_dir: str):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, max_model_len=512, dtype="float32")
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)

    def make(cls, async_scheduling: bool, fairbatch: dict | None):
        vc = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=16),
                        scheduler_config=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=128,
                                                         max_model_len=512, is_encoder_decoder=False,
                                                         enable_chunked_prefill=True,
                                                         async_scheduling=async_scheduling),
                        additional_config={"fairbatch": fairbatch} if fairbatch else {})
        vc.cache_config.num_gpu_blocks = 2048
        vc.scheduler_config.async_scheduling = async_scheduling   # vLLM's CPU platform turns it off
        kc = KVCacheConfig(num_blocks=2048, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec(["layers.0"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64,
                                                             dtype=torch.float32))])
        return cls(vllm_config=vc, kv_cache_config=kc, structured_output_manager=StructuredOutputManager(vc),
                   block_size=16, log_stats=True)

    make.hasher = get_request_block_hasher(16, hash_fn)
    return make


def _token(rid: str, n: int) -> int:
    return 3 + (hash((rid, n)) % 500)


def _run(sched, reqs, in_flight: int) -> tuple[int, float, dict]:
    from vllm.v1.outputs import ModelRunnerOutput

    byid = {r.request_id: r for r in reqs}
    for r in reqs:
        sched.add_request(r)
    finished: dict[str, list[int]] = {}
    pending: deque = deque()
    times: list[float] = []
    steps = 0
    while len(finished) < len(reqs):
        t0 = time.perf_counter()
        out = sched.schedule()
        times.append(time.perf_counter() - t0)
        sampling = [rid for rid in out.num_scheduled_tokens if not sched.requests[rid].is_prefill_chunk]
        pending.append((out, sampling))
        steps += 1
        if len(pending) < in_flight:
            continue
        out, sampling = pending.popleft()
        ids = list(out.num_scheduled_tokens)
        sampled = [[_token(rid, byid[rid].num_output_tokens)] if rid in sampling else [] for rid in ids]
        sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                                        sampled_token_ids=sampled))
        for r in reqs:
            if r.is_finished() and r.request_id not in finished:
                finished[r.request_id] = list(r.output_token_ids)
    return steps, statistics.median(times), finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from vllm import SamplingParams
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    import fairbatch.integrations.vllm as fv

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
        make = _factory(d)
        cases = [("plugin sync", fv.FairBatchingScheduler, False, 1),
                 ("plugin async", fv.FairBatchingScheduler, True, 2),
                 ("plugin async, in-flight 1", fv.FairBatchingAsyncScheduler, True, 1),
                 ("vLLM Scheduler", Scheduler, False, 1),
                 ("vLLM AsyncScheduler", AsyncScheduler, True, 2)]
        ref = None
        for name, cls, is_async, in_flight in cases:
            steps, medians = set(), []
            for _ in range(args.repeats):
                rng = random.Random(5)
                reqs = [Request(f"m{i}", [rng.randint(3, 500) for _ in range(rng.randint(20, 300))],
                                SamplingParams(max_tokens=rng.randint(20, 150), temperature=0.0, ignore_eos=True),
                                None, block_hasher=make.hasher) for i in range(args.requests)]
                plugin = cls not in (Scheduler, AsyncScheduler)
                sched = make(cls, is_async, {"refit": False} if plugin else None)
                assert isinstance(sched, AsyncScheduler) == is_async
                n, med, out = _run(sched, reqs, in_flight)
                assert all(t == [_token(rid, k) for k in range(len(t))] for rid, t in out.items())
                ref = ref or {rid: len(t) for rid, t in out.items()}
                assert {rid: len(t) for rid, t in out.items()} == ref
                steps.add(n)
                medians.append(med * 1e3)
            print(f"{name:28s} steps {sorted(steps)}  median schedule() {statistics.median(medians):.3f} ms")


if __name__ == "__main__":
    main()
