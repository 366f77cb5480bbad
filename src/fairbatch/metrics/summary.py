"""Summaries of request records with `vllm bench serve`'s result-JSON keys and semantics.

Matched against vllm/benchmarks/serve.py (``calculate_metrics`` / ``BenchmarkMetrics`` and
the result dict built in ``benchmark()``):

- ``completed`` / ``failed``: successful / failed requests.
- ``total_input_tokens`` / ``total_output_tokens``: over successful requests only.
- ``*_throughput`` and ``request_goodput``: per second of ``duration``.
- TTFT, E2EL over successful requests; TPOT only over those with output_len > 1; ITL
  pooled over every inter-token gap of every successful request.
- ``mean_/median_/std_`` (np.std, ddof=0) and ``p{P}_`` (np.percentile, linear) in ms;
  ``P`` is written ``99`` for whole numbers and ``99.9`` otherwise. Empty sets give 0.0
  (vLLM's ``np.mean(x or 0)``).
- ``max_output_tokens_per_s`` (output tokens in 1-s buckets from the first successful
  start) and ``max_concurrent_requests`` (sweep over half-open [start, end)).

Latency distributions (TTFT, TPOT, ITL, E2E) are over *served* requests: a refused or
failed request has none. Attainments count every request sent.

Left out on purpose: the per-request lists (``ttfts``, ``itls``, ``input_lens``, ...), the
ASR-only ``rtfx``, and run metadata (``request_rate``, ``burstiness``, ``date``...) which
the caller adds. Ours on top: ``slo_attainment`` etc. and ``per_class``.

Everything is vectorised over one concatenated token-time array: per-token Python loops
would make a 4M-token summary take seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fairbatch.metrics.records import RequestRecord, envelope_deadline, slo_met, vllm_tpot

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)
LATENCY_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")

# Scalar keys of vLLM's generation result dict, in its order (percentile keys aside).
VLLM_HEAD_KEYS: tuple[str, ...] = (
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests",
)
SLO_KEYS: tuple[str, ...] = (
    "slo_attainment", "envelope_attainment", "ttft_attainment", "tpot_attainment",
    "mean_preemptions", "rejected", "relegated",
)


def percentile_key(p: float, metric: str) -> str:
    """vLLM's key for a percentile: p99_ttft_ms, p99.9_ttft_ms."""
    p_word = str(int(p)) if int(p) == p else str(p)
    return f"p{p_word}_{metric}_ms"


def vllm_keys(percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[str]:
    """The vLLM result keys :func:`summarize` emits, in order."""
    keys = list(VLLM_HEAD_KEYS)
    for m in LATENCY_METRICS:
        keys += [f"mean_{m}_ms", f"median_{m}_ms", f"std_{m}_ms"]
        keys += [percentile_key(p, m) for p in percentiles]
    return keys


@dataclass(slots=True)
class _Columns:
    """Records as parallel arrays; token-level arrays hold every output token."""

    arrival: F64
    prompt_len: I64
    output_len: I64
    ttft_slo: F64
    tpot_slo: F64
    success: B
    rejected: B
    relegated: B
    preemptions: F64
    cls: npt.NDArray[Any]     # SLO class: names per batch, codes (StreamingSummary.classes) per run
    ttft: F64              # NaN where no first token
    e2e: F64               # NaN where no end time
    tpot: F64              # NaN where output_len <= 1
    end: F64
    envelope_ok: B
    tok: F64               # all token times, record after record
    tok_rec: I64           # record index of each token
    gap: F64               # inter-token gaps within one request
    gap_rec: I64


def _columns(records: Sequence[RequestRecord]) -> _Columns:
    n = len(records)
    nan = float("nan")
    arrival = np.fromiter((r.arrival for r in records), np.float64, n)
    ttft_slo = np.fromiter((r.ttft_slo for r in records), np.float64, n)
    tpot_slo = np.fromiter((r.tpot_slo for r in records), np.float64, n)
    output_len = np.fromiter((r.output_len for r in records), np.int64, n)
    first = np.fromiter(
        (nan if r.first_token_time is None else r.first_token_time for r in records),
        np.float64, n)
    finish = np.fromiter(
        (nan if r.finish_time is None else r.finish_time for r in records), np.float64, n)
    arrays = [np.asarray(r.token_times, dtype=np.float64) for r in records]
    lens = np.fromiter((len(a) for a in arrays), np.int64, n)
    tok = np.concatenate(arrays) if n else np.zeros(0)
    tok_rec = np.repeat(np.arange(n, dtype=np.int64), lens)
    starts = np.cumsum(lens) - lens
    j = np.arange(len(tok), dtype=np.int64) - np.repeat(starts, lens)
    success = np.fromiter((r.success for r in records), np.bool_, n)

    deadline = envelope_deadline(arrival[tok_rec], ttft_slo[tok_rec], tpot_slo[tok_rec], j)
    late = np.zeros(n, dtype=np.bool_)
    late[tok_rec[tok > deadline]] = True
    envelope_ok = success & (lens > 0) & ~late

    # End falls back to the last token (as RequestRecord.end_time does).
    last_tok = np.full(n, nan)
    has_tok = lens > 0
    last_tok[has_tok] = tok[starts[has_tok] + lens[has_tok] - 1]
    end = np.where(np.isnan(finish), last_tok, finish)

    ttft = first - arrival
    e2e = end - arrival
    tpot = vllm_tpot(ttft, e2e, output_len)

    same = tok_rec[1:] == tok_rec[:-1]
    return _Columns(
        arrival=arrival,
        prompt_len=np.fromiter((r.prompt_len for r in records), np.int64, n),
        output_len=output_len,
        ttft_slo=ttft_slo,
        tpot_slo=tpot_slo,
        success=success,
        rejected=np.fromiter((r.rejected for r in records), np.bool_, n),
        relegated=np.fromiter((r.relegated for r in records), np.bool_, n),
        preemptions=np.fromiter((r.num_preemptions for r in records), np.float64, n),
        cls=np.array([r.slo_class for r in records], dtype=np.str_),
        ttft=ttft, e2e=e2e, tpot=tpot, end=end,
        envelope_ok=envelope_ok,
        tok=tok, tok_rec=tok_rec,
        gap=np.diff(tok)[same], gap_rec=tok_rec[:-1][same],
    )


def _dist(values_s: F64, metric: str, percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/percentiles in ms, vLLM style (0.0 for an empty set)."""
    v = values_s * 1000.0 if len(values_s) else np.zeros(1)
    # One selection pass for the median and all percentiles (the partition dominates the
    # cost on millions of ITLs); the linear-interpolated 50th percentile is np.median up
    # to rounding in the last bit.
    q = np.percentile(v, [50.0, *percentiles])
    out = {
        f"mean_{metric}_ms": float(np.mean(v)),
        f"median_{metric}_ms": float(q[0]),
        f"std_{metric}_ms": float(np.std(v)),
    }
    for p, val in zip(percentiles, q[1:], strict=True):
        out[percentile_key(p, metric)] = float(val)
    return out


def _peak_tokens(c: _Columns, ok: B) -> float:
    """vLLM's max_output_tokens_per_s over the successful requests in ``ok``: output
    tokens in 1-s buckets from the first one's arrival."""
    if not ok.any():
        return 0.0
    t0 = float(c.arrival[ok].min())
    tok = c.tok[ok[c.tok_rec]]
    if not len(tok):
        return 0.0
    buckets = np.floor(np.maximum(tok - t0, 0.0)).astype(np.int64)  # 1-s buckets
    return float(np.bincount(buckets).max())


def _peak_concurrency(c: _Columns, ok: B) -> int:
    """vLLM's max_concurrent_requests over the successful requests in ``ok``."""
    if not ok.any():
        return 0
    starts, ends = c.arrival[ok], c.end[ok]
    ends = np.where(np.isnan(ends), starts, ends)
    times = np.concatenate([starts, ends])
    delta = np.concatenate([np.ones(len(starts), np.int64), -np.ones(len(ends), np.int64)])
    order = np.lexsort((delta, times))          # departures (-1) before arrivals at ties
    return int(max(0, np.cumsum(delta[order]).max()))


def _summarize_sel(
    c: _Columns, sel: B, duration: float, percentiles: Sequence[float], tokens: _Tokens
) -> dict[str, Any]:
    n = int(sel.sum())
    ok = sel & c.success
    completed = int(ok.sum())
    total_in = int(c.prompt_len[ok].sum())
    total_out = int(c.output_len[ok].sum())

    ttft_ok, tpot_ok = slo_met(ok, c.ttft, c.tpot, c.ttft_slo, c.tpot_slo)
    good = ttft_ok & tpot_ok

    def rate(x: int) -> float:
        return x / duration if duration > 0 else 0.0

    def frac(m: B) -> float:
        return float(m.sum()) / n if n else 0.0

    peak_tok, peak_conc = tokens.peak(ok), _peak_concurrency(c, ok)

    out: dict[str, Any] = {
        "duration": float(duration),
        "completed": completed,
        "failed": n - completed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": rate(completed),
        "request_goodput": rate(int(good.sum())),
        "output_throughput": rate(total_out),
        "total_token_throughput": rate(total_in + total_out),
        "max_output_tokens_per_s": peak_tok,
        "max_concurrent_requests": peak_conc,
    }
    ttft = c.ttft[ok]
    tpot = c.tpot[ok & (c.output_len > 1)]
    e2e = c.e2e[ok]
    out |= _dist(ttft[~np.isnan(ttft)], "ttft", percentiles)
    out |= _dist(tpot[~np.isnan(tpot)], "tpot", percentiles)
    out |= tokens.itl(ok, percentiles)
    out |= _dist(e2e[~np.isnan(e2e)], "e2el", percentiles)
    out |= {
        "slo_attainment": frac(good),
        "envelope_attainment": frac(sel & c.envelope_ok),
        "ttft_attainment": frac(ttft_ok),
        "tpot_attainment": frac(tpot_ok),
        "mean_preemptions": float(c.preemptions[sel].mean()) if n else 0.0,
        "rejected": int((sel & c.rejected).sum()),       # refused: SLO misses, in the denominator
        "relegated": int((sel & c.relegated).sum()),
    }
    return out


class _Tokens:
    """The token-level numbers of a selection: exact from every token, or, for a run too
    large to keep its tokens (``stream.StreamingSummary`` sketched), from one SLO class's
    ITL sketch and per-second token counts (``code``: that class, None: all)."""

    def __init__(self, c: _Columns, stream: Any = None, code: int | None = None) -> None:
        self.c, self.stream, self.code = c, stream, code

    def itl(self, ok: B, percentiles: Sequence[float]) -> dict[str, float]:
        if self.stream is None:
            return _dist(self.c.gap[ok[self.c.gap_rec]], "itl", percentiles)
        from fairbatch.metrics.itl import GapSketch

        sketches = self.stream._sketch
        if self.code is not None:
            sk = sketches.get(self.code) or GapSketch(self.stream.relative_accuracy)
        else:
            sk = GapSketch(self.stream.relative_accuracy)
            for part in sketches.values():
                sk.merge(part)
        return sk.dist_ms("itl", percentiles, percentile_key)

    def peak(self, ok: B) -> float:
        if self.stream is None:
            return _peak_tokens(self.c, ok)
        per_s = self.stream._per_s
        parts = [per_s[self.code]] if self.code in per_s else [] if self.code is not None else list(per_s.values())
        if not parts:
            return 0.0
        total = np.zeros(max(len(p) for p in parts), np.int64)
        for p in parts:
            total[: len(p)] += p
        return float(total.max())


def summarize(
    records: Iterable[RequestRecord],
    *,
    duration: float | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """Summarise a run. ``duration`` defaults to first arrival -> last finish.

    Attainments are fractions of ALL requests (failed ones count as misses): that is the
    capacity criterion. Per-class summaries share the run's duration, so their
    throughputs add up to the total. JSON-ready: plain ints and floats only.
    """
    from fairbatch.metrics.stream import StreamingSummary

    stream = StreamingSummary()
    for r in records:
        stream.add(r)
    return stream.summary(duration=duration, percentiles=percentiles)


def summarize_columns(stream: Any, *, duration: float | None, percentiles: Sequence[float]) -> dict[str, Any]:
    """The summary of a ``StreamingSummary``'s requests (what ``summarize`` returns).

    Sketched (a run past ``itl.EXACT_LIMIT`` gaps), two numbers are approximate and the
    summary says so with ``itl_relative_accuracy``: ITL percentiles, within that relative
    error (mean and std stay exact); ``max_output_tokens_per_s``, whose 1-s buckets start
    at ``stream.start`` (the earliest successful arrival when the sketch began, normally
    the run's first) rather than at the earliest successful arrival of the selection.
    """
    n = stream.n
    k = stream.cols
    tok, tok_rec, gap, gap_rec = stream.exact_tokens()
    c = _Columns(
        arrival=k["arrival"][:n], prompt_len=k["prompt_len"][:n], output_len=k["output_len"][:n],
        ttft_slo=k["ttft_slo"][:n], tpot_slo=k["tpot_slo"][:n], success=k["success"][:n],
        rejected=k["rejected"][:n], relegated=k["relegated"][:n], preemptions=k["preemptions"][:n],
        cls=k["cls"][:n], ttft=k["ttft"][:n], e2e=k["e2e"][:n], tpot=k["tpot"][:n], end=k["end"][:n],
        envelope_ok=k["envelope_ok"][:n], tok=tok, tok_rec=tok_rec, gap=gap, gap_rec=gap_rec,
    )
    sketched = stream if stream.sketched else None
    if duration is None:
        ends = c.end[~np.isnan(c.end)]
        last = max(float(ends.max()) if len(ends) else -np.inf,
                   stream.tok_max,
                   float(c.arrival.max()) if n else 0.0)
        duration = last - float(c.arrival.min()) if n else 0.0
    everything = np.ones(n, dtype=np.bool_)
    out = _summarize_sel(c, everything, float(duration), percentiles, _Tokens(c, sketched))
    present = sorted(name for name, code in stream.classes.items() if (c.cls == code).any())
    if len(present) > 1:
        out["per_class"] = {
            name: _summarize_sel(c, c.cls == stream.classes[name], float(duration), percentiles,
                                 _Tokens(c, sketched, stream.classes[name]))
            for name in present
        }
    if sketched is not None:
        out["itl_relative_accuracy"] = stream.relative_accuracy
    return out
