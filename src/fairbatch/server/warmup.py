"""Warm-up before a GPU server says it is healthy.

Triton compiles a kernel the first time it sees a new specialization (integer arguments
that are 1 or divisible by 16, block-table widths, prefill vs decode launches), and the
first cuBLAS call of a shape picks its algorithm: hundreds of milliseconds each, which a
first client would otherwise pay inside its TTFT. A burst of requests of mixed lengths, run to
completion with the server's own policy, go through prefill-only, mixed and decode-only
steps; then the scheduler's and the prefix cache's counters are reset so /metrics starts
at zero.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

log = logging.getLogger("fairbatch.server")


def warm_up(llm: Any, *, count: int = 160, seed: int = 0) -> float:
    """Run the warm-up requests on ``llm`` (an ``engine.LLM``); returns the seconds it took."""
    from fairbatch.engine.params import SamplingParams

    t0 = time.perf_counter()
    rng = random.Random(seed)
    vocab = int(llm.engine.config.vocab_size)
    limit = int(llm.scheduler_config.max_model_len)
    budget = int(llm.engine.args.max_num_batched_tokens)
    cache_tokens = llm.engine.allocator.num_blocks * llm.engine.allocator.block_size
    # Prompt lengths log-uniform from 16 tokens to 4k (one at twice the step budget, which
    # is chunked), outputs of 8-64 tokens, all submitted at once: the steps go through
    # prefill-only, mixed and decode-only shapes of many sizes, as serving a trace does.
    top = max(16, min(limit - 80, 4096))
    lens = [min(limit - 80, 2 * budget)] + [int(16 * (top / 16) ** rng.random()) for _ in range(count - 1)]
    prompts, params = [], []
    used = 0
    for n in lens:
        out = rng.randint(8, 64)
        used += n + out
        if used > cache_tokens // 2:
            break
        prompts.append([rng.randrange(vocab) for _ in range(max(1, n))])
        params.append(SamplingParams(max_tokens=out, ignore_eos=True))
    llm.generate(prompts, params)       # all at once: prefill-only, mixed and decode-only steps
    sched = llm.scheduler
    sched.stats = type(sched.stats)()
    alloc = llm.engine.allocator
    if alloc.prefix_caching:      # its blocks stay cached (random tokens: nobody shares them)
        alloc.prefix_queries = alloc.prefix_hits = 0
    took = time.perf_counter() - t0
    log.info("warm-up done in %.1f s", took)
    return took
