"""Warm-up before a GPU server says it is healthy.

Triton compiles a kernel the first time it sees a new specialization (integer arguments
that are 1 or divisible by 16, block-table widths, prefill vs decode launches), and the
first cuBLAS call of a shape picks its algorithm: hundreds of milliseconds each, which a
first client would otherwise pay inside its TTFT. A few requests of mixed lengths, run to
completion with the server's own policy, go through prefill-only, mixed and decode-only
steps; then the scheduler's counters are reset so /metrics starts at zero.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

log = logging.getLogger("fairbatch.server")


def warm_up(llm: Any, *, seed: int = 0) -> float:
    """Run the warm-up requests on ``llm`` (an ``engine.LLM``); returns the seconds it took."""
    from fairbatch.engine.params import SamplingParams

    t0 = time.perf_counter()
    rng = random.Random(seed)
    vocab = int(llm.engine.config.vocab_size)
    limit = int(llm.scheduler_config.max_model_len)
    budget = int(llm.engine.args.max_num_batched_tokens)
    cache_tokens = llm.engine.allocator.num_blocks * llm.engine.allocator.block_size
    # (prompt length, output length, count): one long prompt (chunked), a few medium ones
    # and many short ones, whose decodes run mixed with the prefills and then alone.
    shapes = [(min(limit - 8, 2 * budget), 4, 1), (min(limit - 40, 700), 32, 6), (min(limit - 40, 40), 32, 90)]
    prompts, params = [], []
    for prompt_len, out_len, count in shapes:
        count = max(1, min(count, cache_tokens // (4 * (prompt_len + out_len))))
        prompts += [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(count)]
        params += [SamplingParams(max_tokens=out_len, ignore_eos=True)] * count
    llm.generate(prompts, params)       # all at once: prefill-only, mixed and decode-only steps
    sched = llm.scheduler
    sched.stats = type(sched.stats)()
    took = time.perf_counter() - t0
    log.info("warm-up done in %.1f s", took)
    return took
