"""Workloads that name shared prefixes: the multi-turn generator and the simulator's use of
trace hash ids."""

from __future__ import annotations

from fairbatch.sim.experiment import Scenario, prepare, run_policy
from fairbatch.workload import load_trace, multi_turn_trace


def test_each_turn_extends_the_last() -> None:
    entries = multi_turn_trace(50, seed=3)
    assert entries[0].arrival == 0.0
    assert [e.arrival for e in entries] == sorted(e.arrival for e in entries)
    sessions: dict[int, list] = {}
    for e in entries:
        assert len(e.hash_ids) == -(-e.prompt_len // 512)
        assert e.hash_ids[:2] == (0, 1)                      # the shared system prompt
        sessions.setdefault(e.hash_ids[2] >> 20, []).append(e)
    assert len(sessions) > 1 and any(len(turns) > 2 for turns in sessions.values())
    for turns in sessions.values():
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.arrival >= prev.arrival
            assert nxt.prompt_len > prev.prompt_len + prev.output_len    # + a user message
            assert nxt.hash_ids[:len(prev.hash_ids)] == prev.hash_ids    # its prefix
    assert multi_turn_trace(50, seed=3) == entries
    assert load_trace("multi-turn", num_requests=10) == multi_turn_trace(seed=0)[:10]


def test_the_simulator_reuses_named_prefixes() -> None:
    """On the multi-turn trace caching computes fewer prompt tokens and meets more first-
    token deadlines; a trace without names runs without it whatever the setting."""
    out = {}
    for caching in (True, False):
        prep = prepare(Scenario(trace="multi-turn", num_requests=300, prefix_caching=caching))
        assert (prep.block_hashes is not None) == caching
        out[caching] = run_policy(prep, "vllm", 4.0).summary
    assert out[True]["prefix_cache_hit_rate"] > 0.5
    assert "prefix_cache_hit_rate" not in out[False]
    assert out[True]["median_ttft_ms"] < out[False]["median_ttft_ms"]
    plain = prepare(Scenario(trace="azure-code", num_requests=50))
    assert plain.block_hashes is None


def test_streamed_cluster_runs_carry_block_names() -> None:
    """sim.split's bounded-memory cluster run, with block names and the caching allocator,
    summarises as run_policy does (the prefix router routes both the same)."""
    import json

    import numpy as np

    from fairbatch.request import SLO
    from fairbatch.sim.split import Cluster, Workload, run_cluster

    prep = prepare(Scenario(trace="multi-turn", num_requests=400, instances=2, router="prefix"))
    kept = run_policy(prep, "vllm", 6.0)
    entries = prep.entries
    work = Workload(np.array([e.arrival / 6.0 for e in entries]), np.array([e.prompt_len for e in entries], np.int32),
                    np.array([e.output_len for e in entries], np.int32), SLO(1.0, 0.05),
                    block_hashes=prep.block_hashes)
    cluster = Cluster("vllm", prep.config, prep.num_blocks, prep.latency, "prefix", prefix_caching=True)
    streamed = run_cluster(cluster, work, 2)
    skip = ("sim_wall_time_s", "request_rate", "num_preemptions", "requests_per_instance", "prefix_cache_hit_rate")
    want = {k: v for k, v in kept.summary.items() if k not in skip}
    assert json.dumps(streamed.summary.summary(), sort_keys=True) == json.dumps(want, sort_keys=True)
    assert streamed.assigned == kept.outcome.assigned
    assert work.subset(np.array([1, 3])).block_hashes == [prep.block_hashes[1], prep.block_hashes[3]]
