"""`vllm bench serve`'s definitions, where they differ from the simulator's summary
(``metrics.summarize``), so that `fairbatch bench` and vLLM's client give the same
numbers on the same run (vllm/benchmarks/serve.py, read for vLLM 0.32):

- arrivals of ``--request-rate R``: the gamma gaps are rescaled so that the schedule
  lasts exactly what the configured rate says (vLLM: ``N / R`` over ``N`` gaps; here the
  first request goes at 0, so ``(N - 1) / R`` over ``N - 1`` gaps);
- ITL: one gap per stream event after the first, pooled over successful requests. A
  server that packs several tokens into one event gives one (longer) gap, not one real
  gap and several zeros;
- ``max_concurrent_requests``: requests active in each whole second after the first
  start (a request counts in every second from its start's to its end's), the maximum;
- the result file name of ``--save-result`` without ``--result-filename``;
- ``--dataset-name random``: lengths uniform in ``[L * (1 - r), L * (1 + r)]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np

from fairbatch.metrics import RequestRecord
from fairbatch.metrics.summary import LATENCY_METRICS, percentile_key
from fairbatch.workload import TraceEntry


def normalize_arrivals(entries: list[TraceEntry], rate: float) -> list[TraceEntry]:
    """The same order and relative gaps, stretched so the mean gap is exactly ``1 / rate``."""
    if not math.isfinite(rate) or len(entries) < 2 or entries[-1].arrival <= 0:
        return entries
    f = (len(entries) - 1) / rate / entries[-1].arrival
    return [replace(e, arrival=e.arrival * f) for e in entries]


def itl_summary(records: Sequence[RequestRecord], events: dict[str, list[float]],
                percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/percentile ITL keys (ms), one gap per event after the first."""
    gaps = [np.diff(np.asarray(events[r.request_id])) for r in records
            if r.success and r.request_id in events and len(events[r.request_id]) > 1]
    v = np.concatenate(gaps) * 1e3 if gaps else np.zeros(1)     # vLLM: np.mean(itls or 0)
    out = {"mean_itl_ms": float(v.mean()), "median_itl_ms": float(np.median(v)), "std_itl_ms": float(v.std())}
    for p in percentiles:
        out[percentile_key(p, "itl")] = float(np.percentile(v, p))
    return out


def max_concurrent_requests(records: Sequence[RequestRecord]) -> int:
    ok = [r for r in records if r.success and r.finish_time is not None]
    if not ok:
        return 0
    t0 = min(r.arrival for r in ok)
    seconds = np.zeros(int(math.ceil(max(r.finish_time for r in ok) - t0)) + 1, np.int64)
    for r in ok:
        seconds[int(r.arrival - t0):int(r.finish_time - t0) + 1] += 1
    return int(seconds.max())


def keep_percentile_metrics(summary: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """Drop the latency keys of metrics not asked for (vLLM writes only the selected)."""
    drop = "|".join(m for m in LATENCY_METRICS if m not in metrics)
    if not drop:
        return summary
    pat = re.compile(rf"^(mean|median|std|p\d+(\.\d+)?)_({drop})_ms$")
    return {k: v for k, v in summary.items() if not pat.match(k)}


def result_filename(label: str, request_rate: float, max_concurrency: int | None, model: str,
                    when: datetime | None = None) -> str:
    """vLLM's default: ``{label}-{rate}qps[-concurrency{C}]-{model}-{YYYYmmdd-HHMMSS}.json``,
    the rate as vLLM's float argument prints (``10.0``, ``inf``)."""
    conc = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{label}-{float(request_rate)}qps{conc}-{model.rstrip('/').split('/')[-1]}-{stamp}.json"


def random_entries(n: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[TraceEntry]:
    """vLLM's random dataset lengths (arrivals come from ``--request-rate``)."""
    if not 0 <= range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, size=n)

    ins, outs = lengths(input_len), lengths(output_len)
    return [TraceEntry(0.0, int(i), int(o), None) for i, o in zip(ins, outs, strict=True)]
