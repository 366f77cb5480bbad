"""Workload package: trace readers on the bundled traces and small fixtures (tests/data), malformed inputs, arrival
processes, transforms, SLO classes and Request construction."""

from __future__ import annotations

import json
import math
import pickle
import tempfile
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairbatch.request import SLO, DeadlineRule
from fairbatch.workload import (
    GammaArrivals,
    PoissonArrivals,
    SLOClass,
    TraceEntry,
    TraceError,
    assign_slos,
    bundled_traces,
    detect_format,
    load_trace,
    make_requests,
    mean_rate,
    parse_slo_classes,
    read_trace,
    retime,
    scale_rate,
    take,
    truncate_to_context,
)

DATA = Path(__file__).resolve().parent / "data"   # small fixtures; see data/README.md


def gaps_cv(entries: list[TraceEntry]) -> float:
    gaps = np.diff([e.arrival for e in entries])
    return float(gaps.std() / gaps.mean())


def check_sorted_from_zero(entries: list[TraceEntry]) -> None:
    arrivals = [e.arrival for e in entries]
    assert arrivals[0] == 0.0
    assert arrivals == sorted(arrivals)
    assert all(e.prompt_len >= 1 and e.output_len >= 1 for e in entries)


# --- the bundled Azure traces (numbers from their published description) -----------------------
@pytest.fixture(scope="module")
def conv() -> list[TraceEntry]:
    return load_trace("azure-conv")


def test_azure_conv_matches_readme(conv: list[TraceEntry]) -> None:
    check_sorted_from_zero(conv)
    assert len(conv) == 19_366
    assert mean_rate(conv) == pytest.approx(5.5, abs=0.05)
    assert conv[-1].arrival == pytest.approx(3501.72, abs=0.01)        # ~1 h
    prompts = np.array([e.prompt_len for e in conv])
    outputs = np.array([e.output_len for e in conv])
    assert prompts.mean() == pytest.approx(1155, abs=1)
    assert np.percentile(prompts, 99) == pytest.approx(4142, abs=1)
    assert outputs.mean() == pytest.approx(211, abs=1)
    assert np.percentile(outputs, 99) == pytest.approx(601, abs=1)
    # 100 ns resolution survives: 18:15:46.6805900 -> 18:15:50.9951690
    assert conv[1].arrival == pytest.approx(4.314579, abs=1e-9)


def test_azure_code_matches_readme() -> None:
    code = load_trace("azure-code")
    check_sorted_from_zero(code)
    assert len(code) == 8_819
    assert np.mean([e.prompt_len for e in code]) == pytest.approx(2048, abs=1)
    assert np.mean([e.output_len for e in code]) == pytest.approx(28, abs=0.5)
    assert gaps_cv(code) == pytest.approx(13, rel=0.05)                 # very bursty


def test_bundled_names(conv: list[TraceEntry]) -> None:
    names = bundled_traces()
    assert set(names) == {"azure-conv", "azure-code", "mooncake", "multi-turn"}
    assert all(isinstance(d, str) and d for d in names.values())
    data = resources.files("fairbatch.workload") / "data" / "AzureLLMInferenceTrace_conv.csv"
    with resources.as_file(data) as path:                       # by name = by path
        assert load_trace(path) == conv
    assert len(load_trace("azure-code")) == 8_819
    assert len(load_trace("azure-conv", num_requests=100)) == 100
    mooncake = load_trace("mooncake")
    assert len(mooncake) == 3_993 and all(len(e.hash_ids) == -(-e.prompt_len // 512) for e in mooncake)


def test_unknown_bundled_name_lists_the_known_ones() -> None:
    with pytest.raises(TraceError, match="azure-conv"):
        load_trace("azure-cnv")


# --- the other formats, on small fixtures in tests/data ------------------------------------------
def test_mooncake_jsonl() -> None:
    path = DATA / "mooncake_format.jsonl"
    assert detect_format(path) == "mooncake"
    trace = load_trace(path)
    check_sorted_from_zero(trace)
    assert len(trace) == 24
    assert trace[0].prompt_len == 3000 and trace[0].output_len == 242
    assert trace[-1].arrival == pytest.approx(9.41)                      # ms -> s


@pytest.mark.parametrize(("name", "kept", "failed"), [
    ("burstgpt1_head110.csv", 105, 5),      # five rows with 0 tokens: failed requests
    ("burstgpt3_head60.csv", 60, 0),        # BurstGPT_3's extra Session ID / Elapsed time columns
])
def test_burstgpt_skips_failures_and_keeps_log_type(name: str, kept: int, failed: int) -> None:
    trace = read_trace(DATA / name)
    assert trace.format == "burstgpt" and trace.timed
    assert (len(trace.entries), trace.skipped) == (kept, failed)
    check_sorted_from_zero(trace.entries)
    assert {e.tag for e in trace.entries} == {"Conversation log", "API log"}


def test_lengths_only_needs_an_arrival_process() -> None:
    path = DATA / "lengths_format.csv"      # Sarathi-Serve / Vidur processed-trace columns
    assert detect_format(path) == "lengths"
    assert not read_trace(path).timed
    with pytest.raises(TraceError, match="arrival"):
        load_trace(path)
    trace = load_trace(path, arrival=PoissonArrivals(10.0))
    assert len(trace) == 40
    assert (trace[0].prompt_len, trace[0].output_len) == (953, 332)
    check_sorted_from_zero(trace)
    assert load_trace(path, arrival=PoissonArrivals(10.0), num_requests=20, seed=1) == \
        load_trace(path, arrival=PoissonArrivals(10.0), num_requests=20, seed=1)


def test_vidur_splitwise_csv(tmp_path: Path) -> None:
    path = tmp_path / "splitwise_conv.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                    "0.5,374,44\n4.8,396,109\n4.8,879,55\n")
    assert detect_format(path) == "vidur"
    assert load_trace(path) == [TraceEntry(0.0, 374, 44), TraceEntry(4.3, 396, 109),
                                TraceEntry(4.3, 879, 55)]


def test_columns_in_any_order_and_case(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("\ufeffgeneratedtokens, contexttokens ,Timestamp\n"
                    "5,10,2023-11-16 18:15:46.6805900\n6,11,2023-11-16 18:15:47\n")
    assert load_trace(path) == [TraceEntry(0.0, 10, 5), TraceEntry(pytest.approx(0.31941), 11, 6)]


# --- round trips (hypothesis) ------------------------------------------------------------
lengths = st.integers(min_value=1, max_value=200_000)
gaps_ns = st.lists(st.tuples(st.integers(0, 10**12), lengths, lengths), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(gaps_ns)
def test_azure_round_trip_is_exact_to_100ns(rows: list[tuple[int, int, int]]) -> None:
    start = datetime(2023, 11, 16, 23, 59, 59, 999_999)                 # crosses midnight
    ticks = 0
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    expected = []
    for gap, prompt, output in rows:
        ticks += gap // 100                                               # 100 ns ticks
        t = start + timedelta(microseconds=ticks // 10)
        lines.append(f"{t:%Y-%m-%d %H:%M:%S}.{t.microsecond:06d}{ticks % 10},{prompt},{output}")
        expected.append((ticks, prompt, output))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "azure.csv"
        path.write_text("\n".join(lines))
        got = load_trace(path)
    t0 = expected[0][0]
    assert [(e.prompt_len, e.output_len) for e in got] == [(p, o) for _, p, o in expected]
    for e, (ticks, _, _) in zip(got, expected, strict=True):
        assert e.arrival == pytest.approx((ticks - t0) * 1e-7, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**7), lengths, lengths), min_size=1, max_size=30))
def test_mooncake_round_trip(rows: list[tuple[int, int, int]]) -> None:
    ms = np.cumsum([g for g, _, _ in rows]).tolist()
    text = "".join(json.dumps({"timestamp": t, "input_length": p, "output_length": o,
                               "hash_ids": [1, 2]}) + "\n"
                   for t, (_, p, o) in zip(ms, rows, strict=True))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.jsonl"
        path.write_text(text)
        got = load_trace(path)
    assert got == [TraceEntry((t - ms[0]) / 1000, p, o, hash_ids=(1, 2))
                   for t, (_, p, o) in zip(ms, rows, strict=True)]


# --- malformed inputs: one clear TraceError naming file and line ------------------------------
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
OK_ROW = "2023-11-16 18:15:46.6805900,374,44\n"

MALFORMED = {
    "bad header": ("trace.csv", "time,prompt,output\n1,2,3\n", 1, "unknown header"),
    "not an integer": ("trace.csv", AZURE_HEADER + OK_ROW * 2 + "2023-11-16 18:15:47.0,5,abc\n",
                       4, "GeneratedTokens is not an integer: 'abc'"),
    "fractional length": ("trace.csv", AZURE_HEADER + "2023-11-16 18:15:47.0,5.5,3\n", 2,
                          "ContextTokens is not an integer"),
    "negative": ("trace.csv", AZURE_HEADER + OK_ROW + "2023-11-16 18:15:47.0,-5,3\n", 3,
                 "ContextTokens is negative"),
    "zero": ("split.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,0\n", 2,
             "num_decode_tokens is 0"),
    "missing column": ("trace.csv", "TIMESTAMP,ContextTokens\n" + OK_ROW, 1, "unknown header"),
    "short row": ("trace.csv", AZURE_HEADER + OK_ROW + "2023-11-16 18:15:47.0,5\n", 3,
                  "expected 3 fields"),
    "bad timestamp": ("trace.csv", AZURE_HEADER + "2023-13-16 18:15:47.0,5,3\n", 2,
                      "TIMESTAMP is not a timestamp"),
    "backwards": ("trace.csv", AZURE_HEADER + OK_ROW + "2023-11-16 18:15:40.0,5,3\n", 3,
                  "goes backwards"),
    "bad seconds": ("split.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\nnan,5,3\n",
                    2, "arrived_at is not finite"),
    "bad json": ("trace.jsonl", ('{"timestamp": 0, "input_length": 5, "output_length": 3}\n'
                                 '{"timestamp": 1, "input_length": 5,\n'), 2, "bad JSON"),
    "json missing key": ("trace.jsonl", '{"timestamp": 0, "input_length": 5}\n', 1,
                         "missing key(s) output_length"),
    "json not object": ("trace.jsonl", "[1, 2, 3]\n", 1, "expected a JSON object"),
    "json string length": ("str.jsonl", '{"timestamp": 0, "input_length": "5", "output_length": 3}',
                           1, "input_length is not an integer"),
    "json backwards": ("trace.jsonl", ('{"timestamp": 5, "input_length": 5, "output_length": 3}\n'
                                       '{"timestamp": 4, "input_length": 5, "output_length": 3}\n'),
                       2, "goes backwards"),
    "empty": ("empty.csv", "", 1, "file is empty"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_trace_raises_trace_error(tmp_path: Path, case: tuple[str, str, int, str]
                                            ) -> None:
    name, text, line, problem = case
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert name in message and f"line {line}:" in message and problem in message, message
    assert (info.value.line, info.value.file) == (line, str(path))


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("missing.csv", None, "no such file"),
    ("header_only.csv", AZURE_HEADER, "no requests"),
    ("all_failed.csv", ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                        "5,ChatGPT,0,0,0,Conversation log\n"), "1 failed rows skipped"),
    ("latin1.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\xe9\n", "not UTF-8"),
])
def test_whole_file_problems(tmp_path: Path, name: str, text: str | None, problem: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_bytes(text.encode("latin-1"))
    with pytest.raises(TraceError, match=problem) as info:
        load_trace(path)
    assert name in str(info.value)


def test_trace_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(TraceError("t.csv", 3, "bad")))
    assert (str(err), err.line) == ("t.csv line 3: bad", 3)


def test_num_requests_beyond_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(AZURE_HEADER + OK_ROW)
    with pytest.raises(TraceError, match="only 1"):
        load_trace(path, num_requests=2)


# --- arrival processes -------------------------------------------------------------------
@pytest.mark.parametrize(("process", "cv"), [
    (PoissonArrivals(4.0), 1.0),
    (GammaArrivals(4.0, 1.0), 1.0),
    (GammaArrivals(4.0, 0.25), 2.0),
    (GammaArrivals(20.0, 4.0), 0.5),
])
def test_arrival_rate_and_cv(process: PoissonArrivals | GammaArrivals, cv: float) -> None:
    times = process.times(40_000, np.random.default_rng(7))
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    # 40k gaps: the rate's relative standard error is cv/200, the CV's a few percent at most.
    assert (len(times) - 1) / times[-1] == pytest.approx(process.rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_arrivals_are_seeded_and_validated() -> None:
    a = PoissonArrivals(3.0).times(100, np.random.default_rng(1))
    assert np.array_equal(a, PoissonArrivals(3.0).times(100, np.random.default_rng(1)))
    assert len(GammaArrivals(1.0, 0.5).times(0, np.random.default_rng(0))) == 0
    assert np.all(PoissonArrivals(math.inf).times(5, np.random.default_rng(0)) == 0)
    assert GammaArrivals(1.0, 0.25).cv == pytest.approx(2.0)
    for bad in (lambda: PoissonArrivals(0.0), lambda: GammaArrivals(1.0, 0.0),
                lambda: GammaArrivals(-1.0), lambda: GammaArrivals(1.0, math.nan)):
        with pytest.raises(ValueError):
            bad()


def test_retime_keeps_lengths_and_order() -> None:
    entries = [TraceEntry(float(i), i + 1, 2 * i + 1, "x") for i in range(50)]
    out = retime(entries, GammaArrivals(2.0, 0.5), seed=3)
    assert [(e.prompt_len, e.output_len, e.tag) for e in out] == \
        [(e.prompt_len, e.output_len, e.tag) for e in entries]
    check_sorted_from_zero(out)
    assert out == retime(entries, GammaArrivals(2.0, 0.5), seed=3)
    assert out != retime(entries, GammaArrivals(2.0, 0.5), seed=4)


# --- transforms ---------------------------------------------------------------------------
def test_scale_rate(conv: list[TraceEntry]) -> None:
    fast = scale_rate(conv, 2.0)
    assert mean_rate(fast) == pytest.approx(2 * mean_rate(conv))
    assert gaps_cv(fast) == pytest.approx(gaps_cv(conv))
    assert [e.prompt_len for e in fast] == [e.prompt_len for e in conv]
    with pytest.raises(ValueError):
        scale_rate(conv, 0.0)


def test_mean_rate_and_take() -> None:
    entries = [TraceEntry(t, 1, 1) for t in (0.0, 1.0, 2.0, 4.0)]
    assert mean_rate(entries) == pytest.approx(0.75)
    assert mean_rate([TraceEntry(0.0, 1, 1)] * 3) == math.inf
    with pytest.raises(ValueError):
        mean_rate(entries[:1])
    assert take(entries, 2) == entries[:2]
    with pytest.raises(ValueError, match="only 4"):
        take(entries, 5)


def test_truncate_clips_output_first() -> None:
    entries = [TraceEntry(0.0, 100, 50), TraceEntry(1.0, 900, 300), TraceEntry(2.0, 5000, 7)]
    out, n = truncate_to_context(entries, 1024)
    assert n == 2
    assert out == [TraceEntry(0.0, 100, 50), TraceEntry(1.0, 900, 124), TraceEntry(2.0, 1023, 1)]


@given(st.lists(st.tuples(lengths, lengths), max_size=20), st.integers(2, 300_000))
def test_truncate_properties(pairs: list[tuple[int, int]], max_len: int) -> None:
    entries = [TraceEntry(float(i), p, o) for i, (p, o) in enumerate(pairs)]
    out, n = truncate_to_context(entries, max_len)
    assert n == sum(p + o > max_len for p, o in pairs)
    for before, after in zip(entries, out, strict=True):
        assert after.prompt_len + after.output_len <= max_len
        assert 1 <= after.output_len <= before.output_len
        assert 1 <= after.prompt_len <= before.prompt_len
        if before.prompt_len + before.output_len <= max_len:
            assert after == before
        elif before.prompt_len < max_len:            # the prompt fits: only output clipped
            assert after.prompt_len == before.prompt_len


# --- SLO classes -------------------------------------------------------------------------
def test_parse_slo_classes() -> None:
    classes = parse_slo_classes("interactive:0.5:0.03:0.3, batch:5:0.15:0.7")
    assert classes == [SLOClass("interactive", 0.5, 0.03, 0.3), SLOClass("batch", 5, 0.15, 0.7)]
    assert classes[0].slo() == SLO(0.5, 0.03, "interactive")
    shares = [c.share for c in parse_slo_classes("a:1:0.1:1,b:2:0.2:3")]
    assert shares == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize(("spec", "problem"), [
    ("", "empty"),
    ("a:1:0.1", "expected name:TTFT_s:TPOT_s:share"),
    ("a:1:0.1:1:2", "expected name"),
    ("a:x:0.1:1", "TTFT is not a number"),
    ("a:1:0.1:0", "share must be a positive"),
    ("a:1:-0.1:1", "tpot must be a positive"),
    ("a:1:0.1:nan", "share must be a positive"),
    (":1:0.1:1", "name must be non-empty"),
    ("a:1:0.1:1,,b:1:0.1:1", "expected name"),
    ("a:1:0.1:1,a:2:0.1:1", "given twice"),
])
def test_parse_slo_classes_errors(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_slo_classes(spec)


def test_assign_slos_by_share_is_seeded() -> None:
    entries = [TraceEntry(float(i), 10, 10) for i in range(20_000)]
    classes = parse_slo_classes("interactive:0.5:0.03:0.3,batch:5:0.15:0.7")
    default = SLO(1.0, 0.05)
    slos = assign_slos(entries, default=default, classes=classes, seed=5)
    assert len(slos) == len(entries)
    share = sum(s.name == "interactive" for s in slos) / len(slos)
    assert share == pytest.approx(0.3, abs=0.015)                       # ~5 standard errors
    assert {s.name for s in slos} == {"interactive", "batch"}
    assert slos == assign_slos(entries, default=default, classes=classes, seed=5)
    assert slos != assign_slos(entries, default=default, classes=classes, seed=6)
    assert assign_slos(entries[:3], default=default) == [default] * 3
    with pytest.raises(ValueError, match="not both"):
        assign_slos(entries, default=default, classes=classes, tag_map={})


def test_assign_slos_by_tag() -> None:
    entries = [TraceEntry(0.0, 1, 1, tag) for tag in ("Conversation log", "API log", None, "x")]
    default = SLO(1.0, 0.05)
    slos = assign_slos(entries, default=default, tag_map={
        "Conversation log": SLOClass("interactive", 0.5, 0.03, 1.0),
        "API log": SLOClass("batch", 5.0, 0.15, 1.0)})
    assert slos == [SLO(0.5, 0.03, "interactive"), SLO(5.0, 0.15, "batch"), default, default]


# --- requests ----------------------------------------------------------------------------
def test_make_requests() -> None:
    entries = [TraceEntry(0.0, 10, 5), TraceEntry(0.5, 20, 1, "API log")]
    slos = [SLO(0.5, 0.03, "interactive"), SLO(5.0, 0.15, "batch")]
    reqs = make_requests(entries, slos, deadline_rule=DeadlineRule.ENVELOPE, id_prefix="t")
    assert [r.request_id for r in reqs] == ["t-0", "t-1"]
    assert [(r.arrival, r.prompt_len, r.max_new_tokens) for r in reqs] == [(0.0, 10, 5),
                                                                           (0.5, 20, 1)]
    assert [r.slo for r in reqs] == slos
    assert all(r.deadline_rule is DeadlineRule.ENVELOPE for r in reqs)
    default = make_requests(entries, SLO(1.0, 0.05))
    assert default[1].request_id == "req-1"
    assert default[0].deadline_rule is DeadlineRule.TPOT_SAFE
    with pytest.raises(ValueError):
        make_requests(entries, slos[:1])
