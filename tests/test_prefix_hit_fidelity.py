"""The simulator's prefix-cache hits against the engine's on the same requests
(benchmarks/sim/prefix_hit_fidelity.py): a window of the multi-turn trace, the engine
fed the token ids the bench sends for its hash ids (tiny-llama's shape, dummy weights,
CPU), the simulator its trace names, the same blocks and policy.

- Each request alone, a cache that never evicts: engine hits == simulator hits == the
  bench's count of shared tokens, to the token and per request.
- All at once in the simulator's order of events, a cache so small that blocks are
  evicted and a request preempted: still equal per request (``vllm`` with ``late=serve``
  reads no clock, so both take the same steps).

And ``sim.split.TiledBlockNames`` (sim_scale.py's hashed traces): tiled copies share no
name, and a run split over processes gives one process's result and hits.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from fairbatch.bench.prefix_prompts import prompt_key, shared_prompt_tokens, trace_prompt
from fairbatch.request import SLO
from fairbatch.sim.experiment import Scenario, prepare
from fairbatch.sim.split import Cluster, TiledBlockNames, Workload, run_cluster

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sim" / "prefix_hit_fidelity.py"


@pytest.fixture(scope="module")
def fid():
    spec = importlib.util.spec_from_file_location("prefix_hit_fidelity", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # (its dataclass looks its module up)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(fid, tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    prep = fid.window("multi-turn", 14, 2500, 4, 4096, "serve", 1024)
    return prep, fid.model_dir(4096), prompt_key(0)


def test_sequential_unbounded_engine_sim_and_bench_agree(fid, setup) -> None:
    prep, model, key = setup
    entries = fid.timed(prep, "sequential", 1.0)
    shared = shared_prompt_tokens([(e.hash_ids, None, e.prompt_len) for e in entries])
    assert shared == shared_prompt_tokens([(None, trace_prompt(e.hash_ids, e.prompt_len, key), e.prompt_len)
                                           for e in entries])
    blocks = sum(-(-(e.prompt_len + e.output_len) // 16) for e in entries)    # never evicts
    sim, rate = fid.run_sim(prep, "vllm", blocks, entries)
    eng = fid.run_engine(prep, "vllm", blocks, entries, "sequential", model, key)
    assert shared > 0.5 * sum(e.prompt_len for e in entries)       # the window does share
    assert eng.hits == sim.hits == shared
    assert eng.queries == sim.queries == sum(e.prompt_len for e in entries)
    assert eng.cached == sim.cached
    assert rate == sim.hits / sim.queries


def test_lockstep_with_eviction_engine_equals_sim(fid, setup) -> None:
    prep, model, key = setup
    entries = fid.timed(prep, "lockstep", 1.0)
    blocks = max(-(-(e.prompt_len + e.output_len) // 16) for e in entries) + 40
    sim, _ = fid.run_sim(prep, "vllm", blocks, entries)
    eng = fid.run_engine(prep, "vllm", blocks, entries, "lockstep", model, key)
    shared = shared_prompt_tokens([(e.hash_ids, None, e.prompt_len) for e in entries])
    assert sim.hits < shared            # the small cache lost some reuse
    assert sim.preemptions > 0
    assert eng.cached == sim.cached and eng.hits == sim.hits and eng.queries == sim.queries
    assert eng.preemptions == sim.preemptions


def test_tiled_names_share_nothing_across_copies_and_split_exactly() -> None:
    prep = prepare(Scenario(trace="multi-turn", num_requests=60))
    m, n = len(prep.entries), 150
    entry = np.arange(n, dtype=np.int64) % m
    offset = (np.arange(n, dtype=np.int64) // m) * TiledBlockNames.stride(prep.block_hashes)
    names = TiledBlockNames(prep.block_hashes, entry, offset)
    assert names[5] == prep.block_hashes[5] and len(names) == n
    first = {h for i in range(m) for h in names[i]}
    assert not first & {h for i in range(m, 2 * m) for h in names[i]}
    assert [len(names[m + i]) for i in range(m)] == [len(b) for b in prep.block_hashes]
    assert names.take(np.array([m + 3]))[0] == names[m + 3]
    prompt = np.array([e.prompt_len for e in prep.entries], np.int32)[entry]
    output = np.array([e.output_len for e in prep.entries], np.int32)[entry]
    arrival = np.cumsum(np.random.default_rng(0).exponential(1 / 20, n))
    work = Workload(arrival, prompt, output, SLO(1.0, 0.05), block_hashes=names)
    cluster = Cluster("vllm", prep.config, 3000, prep.latency, "round_robin", prefix_caching=True)
    one = run_cluster(cluster, work, 2, jobs=1)
    two = run_cluster(cluster, work, 2, jobs=2)
    assert two.jobs == 2
    assert one.prefix_hits > 0 and (one.prefix_hits, one.prefix_queries) == (two.prefix_hits, two.prefix_queries)
    assert one.steps == two.steps and one.summary.summary() == two.summary.summary()
