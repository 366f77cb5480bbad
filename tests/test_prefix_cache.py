"""Prefix caching in the block allocator: block names, sharing, eviction, invariants."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairbatch.kv import BlockAllocator, prompt_block_hashes, trace_block_hashes
from fairbatch.prefix_cache import CachingBlockAllocator
from fairbatch.workload import TraceError, read_trace, scale_rate


def test_prompt_hashes_are_chained_per_full_block() -> None:
    a = prompt_block_hashes(list(range(40)), 16)
    assert len(a) == 2                                   # the last 8 tokens fill no block
    b = prompt_block_hashes([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]                 # block 1 depends on block 0's tokens
    assert prompt_block_hashes(list(range(32)), 16) == a  # a longer prompt extends the chain
    assert prompt_block_hashes(list(range(15)), 16) == []


def test_prompt_hashes_are_the_same_in_another_process() -> None:
    code = "from fairbatch.kv import prompt_block_hashes as h; print(h(list(range(64)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == str(prompt_block_hashes(list(range(64)), 16))


def test_trace_hashes_expand_each_trace_block() -> None:
    got = trace_block_hashes([7, 9], 1000, 16)          # 512 + 488 tokens: 32 + 30 full blocks
    assert len(got) == 62
    assert got[:32] == [7 * 32 + j for j in range(32)]
    assert got[32:] == [9 * 32 + j for j in range(30)]
    # equal hash ids share their sub-blocks; a different id differs from its block on
    assert trace_block_hashes([7, 10], 600, 16)[:32] == got[:32]
    assert trace_block_hashes([7, 10], 600, 16)[32:] != got[32:37]
    assert trace_block_hashes([7], 100, 16) == [224 + j for j in range(6)]
    with pytest.raises(ValueError):
        trace_block_hashes([1], 512, 24)


def test_off_by_default_and_unchanged() -> None:
    a = BlockAllocator(8, 4)
    assert type(a) is BlockAllocator and not a.prefix_caching
    assert a.attach_prefix("r", [1, 2], 12) == 0
    assert isinstance(BlockAllocator(8, 4, prefix_caching=True), CachingBlockAllocator)


def _compute(a: CachingBlockAllocator, rid: str, hashes: list[int], tokens: int) -> None:
    assert a.allocate(rid, tokens)
    a.register(rid, hashes, tokens)


def test_freed_named_blocks_are_reused_and_counted_free() -> None:
    a = BlockAllocator(8, 4, prefix_caching=True)
    h = [11, 12, 13]
    _compute(a, "x", h, 14)                  # 4 blocks, the first 3 full and named
    table = a.block_table("x")
    a.free("x")
    assert a.num_free == 8 and a.num_cached == 3
    # reuse is capped so that the last prompt token is computed: 12 tokens -> 2 blocks
    assert a.attach_prefix("y", h, 12) == 8
    assert a.block_table("y") == table[:2]
    assert a.attach_prefix("z", h, 13) == 12     # shared by reference count
    assert a.block_table("z") == table[:3]
    assert a.num_free == 5
    a.check_invariants()
    a.free("y")
    a.free("z")
    a.check_invariants()
    assert a.num_free == 8


def test_allocation_takes_free_blocks_before_evicting_lru() -> None:
    a = BlockAllocator(4, 4, prefix_caching=True)
    _compute(a, "old", [1], 4)
    _compute(a, "new", [2], 4)
    a.free("old")
    a.free("new")                 # "old" is the least recently used
    assert a.allocate("big", 8)   # the two never-named blocks first
    assert a.num_cached == 2
    assert a.allocate("big", 12)  # then evicts "old"'s block
    assert a.cached_blocks([1]) == 0 and a.cached_blocks([2]) == 1
    assert not a.allocate("big", 20)
    a.check_invariants()


def test_a_prefix_is_evicted_tail_first() -> None:
    a = BlockAllocator(3, 4, prefix_caching=True)
    _compute(a, "x", [1, 2, 3], 12)
    a.free("x")
    assert a.allocate("y", 4)
    assert a.cached_blocks([1, 2, 3]) == 2      # the head survives: longer matches need it


def test_a_duplicate_computation_stays_unnamed() -> None:
    a = BlockAllocator(4, 4, prefix_caching=True)
    _compute(a, "x", [5], 4)
    _compute(a, "y", [5], 4)      # computed concurrently: x's block keeps the name
    a.free("y")
    assert a.num_cached == 1
    a.check_invariants()


def test_record_lookup_counts_tokens() -> None:
    a = BlockAllocator(4, 4, prefix_caching=True)
    a.record_lookup(100, 48)
    assert (a.prefix_queries, a.prefix_hits, a.hit_rate) == (100, 48, 0.48)


ops = st.lists(st.tuples(st.sampled_from(["attach", "grow", "register", "free"]),
                         st.integers(0, 5), st.integers(1, 40)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12))
def test_random_operations_keep_the_invariants(ops, num_blocks: int) -> None:
    """Requests over three shared prompt prefixes: whatever the order of operations, the
    reference counts, name map and free / evictable lists stay consistent, and a request
    only ever receives blocks named by its own prefix."""
    a = BlockAllocator(num_blocks, 4, prefix_caching=True)
    hashes = {i: [100 * (i % 3) + j for j in range(10)] for i in range(6)}
    computed: dict[int, int] = {}
    for op, i, n in ops:
        rid, h = f"r{i}", hashes[i]
        if op == "attach" and not a.num_allocated(rid):
            got = a.attach_prefix(rid, h, n)
            assert got <= max(0, n - 1) and got % 4 == 0
            assert a.cached_blocks(h) >= got // 4
            assert [a._name[b] for b in a.block_table(rid)] == h[:got // 4]   # its own prefix
            computed[i] = got
        elif op == "grow" and a.allocate(rid, computed.get(i, 0) + n):
            computed[i] = min(computed.get(i, 0) + n, a.num_allocated(rid) * 4)
        elif op == "register":
            a.register(rid, h, computed.get(i, 0))
        elif op == "free":
            a.free(rid)
            computed.pop(i, None)
        a.check_invariants()
        assert 0 <= a.num_free <= num_blocks
    for i in range(6):
        a.free(f"r{i}")
    a.check_invariants()
    assert a.num_free == num_blocks


def test_mooncake_reader_keeps_hash_ids(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [0, 1]}\n'
                    '{"timestamp": 5, "input_length": 20, "output_length": 2}\n')
    entries = read_trace(path).entries
    assert entries[0].hash_ids == (0, 1) and entries[1].hash_ids is None
    assert scale_rate(entries, 2.0)[0].hash_ids == (0, 1)


@pytest.mark.parametrize("bad", ['"x"', '[1, "2"]', '[true]', '{"a": 1}'])
def test_mooncake_reader_names_the_line_of_bad_hash_ids(tmp_path, bad: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 6, "output_length": 2}\n'
                    f'{{"timestamp": 1, "input_length": 6, "output_length": 2, "hash_ids": {bad}}}\n')
    with pytest.raises(TraceError, match="line 2: hash_ids"):
        read_trace(path)
