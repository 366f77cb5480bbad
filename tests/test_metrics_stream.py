"""Streaming summaries: requests fed as they finish, in any order, give `summarize`'s
numbers to the bit while exact; sketched (past the exact limit) only the ITL percentiles
and the per-second token peak move, the percentiles within the stated relative error;
split runs merge into the whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fairbatch.metrics import RequestRecord, summarize
from fairbatch.metrics.itl import RELATIVE_ACCURACY
from fairbatch.metrics.stream import StreamingSummary


def _records(n: int = 600, seed: int = 3) -> list[RequestRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 60))
        arrival = i * 0.02
        t = arrival + 0.05 + np.cumsum(rng.lognormal(-3.5, 0.5, k))
        ok = bool(rng.random() > 0.05) and k > 0
        out.append(RequestRecord(
            request_id=str(i), arrival=arrival, prompt_len=int(rng.integers(1, 900)), output_len=k,
            ttft_slo=0.2, tpot_slo=0.04, slo_class="abc"[i % 3], first_token_time=float(t[0]) if k else None,
            token_times=t, finish_time=float(t[-1]) if k else None, success=ok,
            error=None if ok else "boom", num_preemptions=int(rng.integers(0, 2)), relegated=bool(i % 7 == 0)))
    return out


def _dump(s: dict) -> str:
    return json.dumps(s, sort_keys=True)


def test_fed_in_finish_order_is_summarize_to_the_bit() -> None:
    recs = _records()
    order = sorted(range(len(recs)), key=lambda i: recs[i].end_time or recs[i].arrival)
    stream = StreamingSummary()
    for i in order:
        stream.add(recs[i], i)
    assert _dump(stream.summary()) == _dump(summarize(recs))
    assert set(summarize(recs)["per_class"]) == {"a", "b", "c"}


def test_every_index_must_be_added_once() -> None:
    recs = _records(10)
    s = StreamingSummary()
    s.add(recs[0], 0)
    s.add(recs[2], 2)
    with pytest.raises(ValueError, match="never added"):
        s.summary()
    s.add(recs[2], 2)
    with pytest.raises(ValueError, match="twice"):
        s.flush()


def test_sketched_moves_only_itl_percentiles_and_token_peak_within_the_error() -> None:
    recs = _records(1500)
    exact = summarize(recs)
    stream = StreamingSummary(exact_limit=5000)      # the run has ~40k gaps
    for i, r in enumerate(recs):
        stream.add(r, i)
    sk = stream.summary()
    assert stream.sketched and sk.pop("itl_relative_accuracy") == RELATIVE_ACCURACY
    for part_exact, part_sk in [(exact, sk)] + [(exact["per_class"][c], sk["per_class"][c]) for c in "abc"]:
        for key, v in part_exact.items():
            if key == "per_class":
                continue
            if key.endswith("_itl_ms") and not key.startswith(("mean", "std")):
                # the sketch's guarantee, plus the gap between neighbouring ranks that
                # np.percentile interpolates across
                assert part_sk[key] == pytest.approx(v, rel=RELATIVE_ACCURACY + 0.002), key
            elif key in ("mean_itl_ms", "std_itl_ms"):
                assert part_sk[key] == pytest.approx(v, rel=1e-9), key
            elif key == "max_output_tokens_per_s":
                assert part_sk[key] >= 0.8 * v, key      # buckets may start elsewhere
            else:
                assert part_sk[key] == v, key


@pytest.mark.parametrize("limit", [10**9, 3000])
def test_split_runs_merge_into_the_whole(limit: int) -> None:
    recs = _records(900)
    whole = StreamingSummary(exact_limit=limit, start=0.0)
    parts = [StreamingSummary(exact_limit=limit, start=0.0) for _ in range(3)]
    for i, r in enumerate(recs):
        whole.add(r, i)
        parts[i % 3].add(r, i)
    merged = parts[0]
    merged.merge(parts[1])
    merged.merge(parts[2])
    a, b = whole.summary(), merged.summary()
    if limit > 10**6:
        assert _dump(a) == _dump(b)
    else:
        for key in ("p99_itl_ms", "median_itl_ms", "max_output_tokens_per_s", "slo_attainment", "mean_e2el_ms"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
