"""Split-KV's split count (engine/attention/split_kv.py): the attention kernel compiles one
variant per count, so every count a step can pick must be one start-up compiles
(``split_variants``), or serving stalls on a compile; and the counts must fill the GPU
when few sequences decode without splitting once the decodes alone fill it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fairbatch.engine.attention.split_kv import MAX_SPLITS, decode_splits, split_variants


def test_split_variants_are_the_powers_of_two_above_one() -> None:
    assert split_variants(16) == [2, 4, 8, 16]
    assert split_variants(1) == []
    assert split_variants(2) == [2]


@given(n_dec=st.integers(0, 2048), kv_heads=st.sampled_from([1, 2, 4, 8, 16]),
       sms=st.sampled_from([8, 78, 114, 132, 144]), per_sm=st.integers(0, 8),
       max_splits=st.sampled_from([1, 2, 4, 8, 16]))
def test_every_count_is_compiled_at_start_up_and_fills_the_gpu(n_dec, kv_heads, sms, per_sm, max_splits) -> None:
    s = decode_splits(n_dec, kv_heads, sms, per_sm, max_splits)
    assert s == 1 or s in split_variants(max_splits)
    target = per_sm * sms
    programs = max(1, n_dec) * kv_heads
    if programs >= target:
        assert s == 1                               # the decodes alone fill the GPU
    elif s < max_splits:
        assert programs * s >= target               # enough programs, not capped
    # more decodes never split more (graphs of larger batches stay unsplit)
    assert decode_splits(n_dec + 1, kv_heads, sms, per_sm, max_splits) <= s


def test_llama_on_an_h100() -> None:
    """8 KV heads, 132 SMs, the default 2 programs per SM (264 in all): one to four decodes
    get 16 splits, 32 decodes 2, 33 and more none."""
    assert [decode_splits(n, 8, 132) for n in (1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 128)] == \
        [MAX_SPLITS, 16, 16, 16, 8, 8, 4, 2, 2, 1, 1]
