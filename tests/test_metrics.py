"""Metrics: hand-computed vLLM-style summaries, SLO/envelope attainment, capacity search,
report layout and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fairbatch.metrics import (
    SLO_KEYS,
    RequestRecord,
    find_capacity,
    format_summary_block,
    percentile_key,
    plot_attainment_vs_rate,
    plot_metric_vs_rate,
    plot_ttft_cdf,
    record_from_request,
    summarize,
    summary_table,
    vllm_keys,
)
from fairbatch.request import SLO, Request, RequestState

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
approx = pytest.approx


def rec(rid: str, arrival: float, times: list[float], *, ttft_slo: float = 0.2,
        tpot_slo: float = 0.15, prompt_len: int = 10, cls: str = "default",
        success: bool = True, finish: float | None = None, preempt: int = 0) -> RequestRecord:
    t = np.asarray(times, dtype=np.float64)
    return RequestRecord(
        request_id=rid, arrival=arrival, prompt_len=prompt_len, output_len=len(t),
        ttft_slo=ttft_slo, tpot_slo=tpot_slo, slo_class=cls,
        first_token_time=float(t[0]) if len(t) else None, token_times=t,
        finish_time=finish if finish is not None else (float(t[-1]) if len(t) else None),
        success=success, error=None if success else "boom", num_preemptions=preempt,
    )


@pytest.fixture
def four() -> list[RequestRecord]:
    return [
        # A: ttft .1, e2e .5, tpot .4/3, itls .1 .2 .1; inside SLO and envelope
        rec("A", 0.0, [0.1, 0.2, 0.4, 0.5], prompt_len=10, preempt=2),
        # B: ttft .3 > .2 (misses TTFT, first token outside envelope), tpot .05
        rec("B", 1.0, [1.3, 1.35, 1.4], prompt_len=20),
        # C: one token: no TPOT (counts as met), no ITL
        rec("C", 2.0, [2.1], prompt_len=30),
        # D: failed, no tokens; counts against attainment, not in latency stats
        rec("D", 2.5, [], prompt_len=7, success=False),
    ]


# --- records --------------------------------------------------------------------------
def test_record_properties(four: list[RequestRecord]) -> None:
    a, b, c, d = four
    assert a.ttft == approx(0.1) and a.e2e == approx(0.5) and a.tpot == approx(0.4 / 3)
    assert a.itls == approx([0.1, 0.2, 0.1])
    assert a.meets_slo and a.meets_envelope
    assert b.tpot == approx(0.05) and not b.meets_slo and not b.meets_envelope
    assert b.meets_tpot and not b.meets_ttft
    assert c.tpot is None and c.meets_slo and c.meets_envelope and len(c.itls) == 0
    assert d.ttft is None and d.e2e is None and d.tpot is None
    assert not d.meets_slo and not d.meets_envelope


def test_envelope_and_mean_tpot_are_different_criteria() -> None:
    # Meets mean TPOT exactly (0.375 / 3 = 0.125) but token 1 is late on its envelope
    # deadline 1.125 (binary-exact values keep the comparisons exact).
    late_token = rec("x", 0.0, [1.0, 1.25, 1.3125, 1.375], ttft_slo=1.0, tpot_slo=0.125)
    assert late_token.tpot == 0.125
    assert late_token.meets_slo and not late_token.meets_envelope
    # Early first token banks slack: every token inside the envelope, but vLLM's TPOT
    # (measured from the first token) is (1.25 - 0.25) / 2 = 0.5 > 0.125.
    early_first = rec("y", 0.0, [0.25, 1.125, 1.25], ttft_slo=1.0, tpot_slo=0.125)
    assert early_first.meets_envelope and not early_first.meets_slo
    assert early_first.meets_ttft and not early_first.meets_tpot
    s = summarize([late_token, early_first])
    assert s["slo_attainment"] == 0.5 and s["envelope_attainment"] == 0.5
    assert s["ttft_attainment"] == 1.0 and s["tpot_attainment"] == 0.5


def test_record_from_request() -> None:
    r = Request("r1", arrival=1.0, prompt_len=5, max_new_tokens=3, slo=SLO(0.5, 0.1, "chat"))
    for t in (1.2, 1.3, 1.45):
        r.record_token(t)
    r.state, r.finish_time, r.finish_reason, r.num_preemptions = (
        RequestState.FINISHED, 1.45, "length", 1)
    x = record_from_request(r)
    assert (x.request_id, x.prompt_len, x.output_len, x.slo_class) == ("r1", 5, 3, "chat")
    assert (x.ttft_slo, x.tpot_slo, x.num_preemptions) == (0.5, 0.1, 1)
    assert x.success and x.error is None
    assert x.ttft == approx(0.2) and x.tpot == approx(0.125) and x.e2e == approx(0.45)
    assert list(x.token_times) == [1.2, 1.3, 1.45]
    r.record_token(9.0)                       # the record is a copy, not a view
    assert len(x.token_times) == 3

    aborted = Request("r2", 0.0, 5, 3, SLO(0.5, 0.1))
    aborted.state, aborted.finish_reason = RequestState.ABORTED, "abort"
    y = record_from_request(aborted)
    assert not y.success and y.error == "aborted" and y.output_len == 0
    running = Request("r3", 0.0, 5, 3, SLO(0.5, 0.1))
    assert record_from_request(running).error == "unfinished (waiting)"


# --- summary: hand-computed -----------------------------------------------------------
def test_summary_hand_computed(four: list[RequestRecord]) -> None:
    s = summarize(four, duration=2.0, percentiles=(50, 90, 95, 99))
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 8)  # D excluded
    assert s["duration"] == 2.0
    assert s["request_throughput"] == approx(1.5)
    assert s["request_goodput"] == approx(1.0)              # A and C
    assert s["output_throughput"] == approx(4.0)
    assert s["total_token_throughput"] == approx(34.0)
    # TTFT [100, 300, 100] ms
    assert s["mean_ttft_ms"] == approx(500 / 3)
    assert s["median_ttft_ms"] == approx(100)
    assert s["std_ttft_ms"] == approx(math.sqrt(((200 / 3) ** 2 * 2 + (400 / 3) ** 2) / 3))
    assert s["p50_ttft_ms"] == approx(100)
    assert s["p90_ttft_ms"] == approx(260)   # linear: idx 1.8 -> 100 + .8 * 200
    assert s["p95_ttft_ms"] == approx(280)
    assert s["p99_ttft_ms"] == approx(296)
    # TPOT only over output_len > 1: [133.33, 50]
    assert s["mean_tpot_ms"] == approx((400 / 3 + 50) / 2)
    assert s["median_tpot_ms"] == approx((400 / 3 + 50) / 2)
    assert s["p99_tpot_ms"] == approx(50 + 0.99 * (400 / 3 - 50))
    # ITL pooled: [100, 200, 100, 50, 50]
    assert s["mean_itl_ms"] == approx(100)
    assert s["median_itl_ms"] == approx(100)
    assert s["p90_itl_ms"] == approx(160)
    assert s["p99_itl_ms"] == approx(196)
    assert s["std_itl_ms"] == approx(float(np.std([100, 200, 100, 50, 50])))
    # E2EL [500, 400, 100]
    assert s["mean_e2el_ms"] == approx(1000 / 3)
    assert s["median_e2el_ms"] == approx(400)
    assert s["p99_e2el_ms"] == approx(498)
    # attainment over all 4, failed D counts as a miss
    assert s["slo_attainment"] == 0.5
    assert s["ttft_attainment"] == 0.5
    assert s["tpot_attainment"] == 0.75
    assert s["envelope_attainment"] == 0.5
    assert s["mean_preemptions"] == 0.5
    # vLLM peaks: 4 tokens of A in second 0; one request at a time
    assert s["max_output_tokens_per_s"] == 4.0 and s["max_concurrent_requests"] == 1
    assert "per_class" not in s


def test_summary_matches_numpy_on_random_data() -> None:
    rng = np.random.default_rng(7)
    recs = []
    for i in range(300):
        n = int(rng.integers(0, 30))
        t = i * 0.05 + 0.1 + np.cumsum(rng.exponential(0.04, n))
        recs.append(rec(str(i), i * 0.05, list(t), ttft_slo=0.15, tpot_slo=0.05,
                        success=bool(rng.random() > 0.05) and n > 0, cls="ab"[i % 2]))
    s = summarize(recs, percentiles=(99.9,))
    ok = [r for r in recs if r.success]
    itl = np.concatenate([r.itls for r in ok]) * 1000
    assert s["median_itl_ms"] == approx(float(np.median(itl)))
    assert s["p99.9_itl_ms"] == approx(float(np.percentile(itl, 99.9)))
    tpots = [r.tpot * 1000 for r in ok if r.output_len > 1]
    assert s["mean_tpot_ms"] == approx(float(np.mean(tpots)))
    # the vectorised attainments agree with the per-record definitions
    for key, prop in (("slo_attainment", "meets_slo"), ("envelope_attainment", "meets_envelope"),
                      ("ttft_attainment", "meets_ttft"), ("tpot_attainment", "meets_tpot")):
        assert s[key] == approx(np.mean([getattr(r, prop) for r in recs])), key
        for cls, cs in s["per_class"].items():
            sub = [getattr(r, prop) for r in recs if r.slo_class == cls]
            assert cs[key] == approx(np.mean(sub)), (key, cls)
    first, last = recs[0].arrival, max(r.end_time or r.arrival for r in recs)
    assert s["duration"] == approx(last - first)


def test_default_duration_spans_first_arrival_to_last_event(four: list[RequestRecord]) -> None:
    assert summarize(four)["duration"] == approx(2.5)        # D arrives at 2.5 and fails
    assert summarize(four[:3])["duration"] == approx(2.1)


def test_per_class_split() -> None:
    recs = [
        rec("a", 0.0, [0.1, 0.2], cls="chat"),                # meets
        rec("b", 0.0, [0.5, 0.6], cls="chat"),                # TTFT miss
        rec("c", 0.0, [0.1, 0.2, 0.3], cls="api", ttft_slo=1.0),
    ]
    s = summarize(recs, duration=1.0, percentiles=(99,))
    assert set(s["per_class"]) == {"chat", "api"}
    chat, api = s["per_class"]["chat"], s["per_class"]["api"]
    assert set(chat) == set(s) - {"per_class"} == set(api)
    assert chat["completed"] == 2 and chat["slo_attainment"] == 0.5
    assert api["completed"] == 1 and api["slo_attainment"] == 1.0
    assert chat["mean_ttft_ms"] == approx(300) and api["mean_ttft_ms"] == approx(100)
    assert s["slo_attainment"] == approx(2 / 3)
    # classes share the run's duration, so rates add up
    assert chat["request_goodput"] + api["request_goodput"] == approx(s["request_goodput"])
    assert chat["output_throughput"] + api["output_throughput"] == approx(s["output_throughput"])


VLLM_KEYS_P99 = [  # vllm/benchmarks/serve.py result dict with --metric-percentiles 99
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests",
    "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "std_itl_ms", "p99_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "std_e2el_ms", "p99_e2el_ms",
]


def test_key_set_is_vllms_plus_ours(four: list[RequestRecord]) -> None:
    s = summarize(four, percentiles=(99,))
    assert vllm_keys((99,)) == VLLM_KEYS_P99
    assert set(s) == set(VLLM_KEYS_P99) | set(SLO_KEYS)
    assert list(s)[: len(VLLM_KEYS_P99)] == VLLM_KEYS_P99
    assert percentile_key(99.9, "ttft") == "p99.9_ttft_ms"
    assert percentile_key(50.0, "itl") == "p50_itl_ms"
    s2 = summarize(four, percentiles=(25, 99.9))
    assert "p99.9_tpot_ms" in s2 and "p25_e2el_ms" in s2 and "p99_tpot_ms" not in s2


def test_empty_and_all_failed_are_zero_not_nan() -> None:
    for recs in ([], [rec("f", 0.0, [], success=False)]):
        s = summarize(recs)
        json.dumps(s)
        assert set(s) == set(vllm_keys()) | set(SLO_KEYS)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in s.values())
        assert s["completed"] == 0 and s["slo_attainment"] == 0.0
        assert s["mean_ttft_ms"] == 0.0 and s["p99_itl_ms"] == 0.0


def test_summary_is_json_plain(four: list[RequestRecord]) -> None:
    four[0].slo_class = "other"
    s = summarize(four)
    assert json.loads(json.dumps(s)) == s       # plain ints/floats, round-trips


# --- capacity -------------------------------------------------------------------------
def make_run(att, calls: list[float] | None = None):
    def run(scale: float) -> dict:
        if calls is not None:
            calls.append(scale)
        return {"slo_attainment": att(scale), "request_throughput": 2.0 * scale}
    return run


def smooth(s: float) -> float:
    return 1.0 / (1.0 + (s / 4.0) ** 4)


SMOOTH_CAP = 4.0 * (1 / 9) ** 0.25          # smooth(s) >= 0.9  <=>  s <= this


@pytest.mark.parametrize("lo,hi", [(1.0, None), (0.3, 50.0), (10.0, None), (7.0, 100.0)])
def test_capacity_monotone(lo: float, hi: float | None) -> None:
    calls: list[float] = []
    seen: list[float] = []
    r = find_capacity(make_run(smooth, calls), lo=lo, hi=hi,
                      on_point=lambda s, rate, summ: seen.append(s))
    assert r.status == "ok"
    assert SMOOTH_CAP / 1.02 <= r.rate_scale <= SMOOTH_CAP
    assert r.request_rate == approx(2.0 * r.rate_scale)
    assert len(calls) == len(set(calls)) == len(r.points) == len(seen)   # no re-runs
    assert [p[0] for p in r.points] == sorted(calls)
    json.dumps(r.to_dict())


def test_capacity_step_and_request_rate_key() -> None:
    def run(s: float) -> dict:
        return {"slo_attainment": 1.0 if s <= 3.7 else 0.5, "request_rate": 10 * s,
                "request_throughput": 1.0}
    r = find_capacity(run, lo=1.0, rel_tol=0.001, max_iter=30)
    assert 3.7 / 1.001 <= r.rate_scale <= 3.7
    assert r.request_rate == approx(10 * r.rate_scale)        # caller's rate preferred
    r2 = find_capacity(lambda s: {"envelope_attainment": 0.99 if s < 2 else 0.0},
                       lo=1.0, key="envelope_attainment", target=0.99)
    assert 2 / 1.02 <= r2.rate_scale < 2 and r2.key == "envelope_attainment"


def test_capacity_non_monotone_noise() -> None:
    def noisy(s: float) -> float:
        return smooth(s) + 0.03 * math.sin(37.0 * s)
    lo_band = 4.0 * (0.07 / 0.93) ** 0.25    # smooth = 0.93
    hi_band = 4.0 * (0.13 / 0.87) ** 0.25    # smooth = 0.87
    r = find_capacity(make_run(noisy), lo=1.0)
    assert lo_band / 1.02 <= r.rate_scale <= hi_band
    by_scale = {p[0]: p[2]["slo_attainment"] for p in r.points}
    assert by_scale[r.rate_scale] >= 0.9             # reported scale was measured to pass
    failing_above = [s for s, a in by_scale.items() if s > r.rate_scale and a < 0.9]
    assert failing_above and min(failing_above) <= r.rate_scale * 1.02 + 1e-12


def test_capacity_factor_and_seen_runs() -> None:
    """``factor`` sets the step out of the bracket; runs handed in through ``seen`` are
    not run again (a served driver's grid of fixed loads)."""
    calls: list[float] = []
    r = find_capacity(make_run(lambda s: 1.0 if s <= 1.7 else 0.0, calls), lo=1.0, factor=1.25, max_iter=0)
    assert calls == [1.0, 1.25, 1.5625, 1.953125] and r.rate_scale == 1.5625
    calls.clear()
    r = find_capacity(make_run(lambda s: 1.0 if s <= 0.7 else 0.0, calls), lo=1.0, factor=1.25, max_iter=0)
    assert calls == [1.0, 0.8, 0.64] and r.rate_scale == 0.64
    calls.clear()
    seen = {s: (s, 2.0 * s, {"slo_attainment": 1.0 if s <= 3.0 else 0.0}) for s in (2.0, 4.0)}
    r = find_capacity(make_run(lambda s: 1.0 if s <= 3.0 else 0.0, calls), lo=2.0, hi=4.0, max_iter=1,
                      rel_tol=0.0, seen=seen)
    assert calls == [math.sqrt(8.0)] and len(r.points) == 3
    with pytest.raises(ValueError):
        find_capacity(make_run(smooth), lo=1.0, factor=1.0)


def test_capacity_always_pass_and_always_fail() -> None:
    r = find_capacity(make_run(lambda s: 1.0), lo=1.0, max_expand=5)
    assert r.status == "above_range" and r.rate_scale == 32.0 and len(r.points) == 6
    r = find_capacity(make_run(lambda s: 1.0), lo=1.0, hi=8.0)
    assert r.status == "above_range" and r.rate_scale == 8.0 and len(r.points) == 2
    r = find_capacity(make_run(lambda s: 0.0), lo=1.0, max_expand=4)
    assert r.status == "below_range" and r.rate_scale == 0.0 and r.request_rate == 0.0
    assert len(r.points) == 5 and min(p[0] for p in r.points) == 1 / 16
    r = find_capacity(make_run(lambda s: float("nan")), lo=1.0, max_expand=2)
    assert r.status == "below_range"                     # NaN never passes
    with pytest.raises(ValueError):
        find_capacity(make_run(smooth), lo=0.0)
    with pytest.raises(ValueError):
        find_capacity(make_run(smooth), lo=2.0, hi=1.0)


# --- report ---------------------------------------------------------------------------
def test_format_summary_block_layout(four: list[RequestRecord]) -> None:
    four[0].slo_class = "chat"
    s = summarize(four, duration=2.0, percentiles=(99,)) | {"request_rate": 2.0}
    lines = format_summary_block(s).splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert f"{'Successful requests:':<40} {3:<10}" in lines
    assert f"{'Failed requests:':<40} {1:<10}" in lines
    assert f"{'Request rate configured (RPS):':<40} {2.0:<10.2f}" in lines
    assert f"{'Benchmark duration (s):':<40} {2.0:<10.2f}" in lines
    assert f"{'Total generated tokens:':<40} {8:<10}" in lines
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "---------------Inter-token Latency----------------" in lines
    assert f"{'Mean TTFT (ms):':<40} {500 / 3:<10.2f}" in lines
    assert f"{'P99 ITL (ms):':<40} {196.0:<10.2f}" in lines
    assert f"{'SLO attainment (%):':<40} {50.0:<10.2f}" in lines
    assert any(line.startswith("  [chat] SLO attainment") for line in lines)
    order = [i for i, line in enumerate(lines) if line.startswith(("Mean ", "Median ", "P99 "))]
    assert [lines[i].split()[0] for i in order[:3]] == ["Mean", "Median", "P99"]


def test_summary_table_renders(four: list[RequestRecord]) -> None:
    s = summarize(four, duration=2.0)
    rows = [s | {"policy": "fairbatching", "request_rate": 2.0}, {"policy": "sarathi"}]
    table = summary_table(rows, title="capacity")
    assert [c.header for c in table.columns][:2] == ["Policy", "Rate\nreq/s"]
    console = Console(record=True, width=80)
    console.print(table)
    text = console.export_text()
    assert "fairbatching" in text and "50.0%" in text and "sarathi" in text and "-" in text
    assert "…" not in text                              # nothing truncated at 80 columns


# --- plots ----------------------------------------------------------------------------
def _is_png(p: Path) -> bool:
    return p.exists() and p.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p1 = plot_ttft_cdf({"fairbatching": list(rng.lognormal(-2, 1, 500)),
                        "sarathi": list(rng.lognormal(-1.5, 1.2, 500))},
                       tmp_path / "cdf.png", "TTFT CDF", slo=0.5)
    curves = {"fairbatching": [(1.0, 1.0), (2.0, 0.97), (3.0, 0.85)],
              "sarathi": [(3.0, 0.6), (1.0, 0.99), (2.0, 0.88)]}
    p2 = plot_attainment_vs_rate(curves, tmp_path / "sub" / "att.png", 0.9,
                                 "SLO attainment", "SLO attainment")
    p3 = plot_metric_vs_rate({"x": [(1.0, 50.0), (2.0, 80.0)]}, tmp_path / "p99.png",
                             "p99 TTFT", "p99 TTFT (ms)", hline=100.0, log_y=True)
    for p in (p1, p2, p3):
        assert _is_png(p)
