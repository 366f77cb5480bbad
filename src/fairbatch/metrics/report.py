"""Text reports: `vllm bench serve`'s printed result block, and a rich table for the CLI."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table

from fairbatch.metrics.summary import LATENCY_METRICS

# metric attribute -> (printed name, section header), as vLLM prints them.
_SECTIONS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


def _line(label: str, value: Any, fmt: str = "") -> str:
    # vLLM: "{:<40} {:<10}" / "{:<40} {:<10.2f}" (trailing pad kept for identical output)
    return f"{label:<40} {value:<10{fmt}}"


def _percentiles(summary: Mapping[str, Any], metric: str) -> list[tuple[float, str]]:
    found = []
    for k in summary:
        m = re.fullmatch(rf"p(\d+(?:\.\d+)?)_{metric}_ms", k)
        if m:
            found.append((float(m.group(1)), m.group(1)))
    return sorted(found)


def format_summary_block(
    summary: Mapping[str, Any], title: str = "Serving Benchmark Result"
) -> str:
    """The block `vllm bench serve` prints, same labels and widths, plus our SLO lines."""
    s = summary
    out = [f"{' ' + title + ' ':=^50}"]
    out.append(_line("Successful requests:", s.get("completed", 0)))
    out.append(_line("Failed requests:", s.get("failed", 0)))
    if s.get("max_concurrency") is not None:
        out.append(_line("Maximum request concurrency:", s["max_concurrency"]))
    rate = s.get("request_rate")
    if isinstance(rate, (int, float)) and math.isfinite(rate):
        out.append(_line("Request rate configured (RPS):", rate, ".2f"))
    out.append(_line("Benchmark duration (s):", s.get("duration", 0.0), ".2f"))
    out.append(_line("Total input tokens:", s.get("total_input_tokens", 0)))
    out.append(_line("Total generated tokens:", s.get("total_output_tokens", 0)))
    out.append(_line("Request throughput (req/s):", s.get("request_throughput", 0.0), ".2f"))
    if s.get("request_goodput", 0.0) is not None:      # None: no goodput SLO asked for (vLLM omits the line)
        out.append(_line("Request goodput (req/s):", s.get("request_goodput", 0.0), ".2f"))
    out.append(_line("Output token throughput (tok/s):", s.get("output_throughput", 0.0), ".2f"))
    out.append(_line("Peak output token throughput (tok/s):",
                     s.get("max_output_tokens_per_s", 0.0), ".2f"))
    out.append(_line("Peak concurrent requests:", s.get("max_concurrent_requests", 0), ".2f"))
    out.append(_line("Total token throughput (tok/s):",
                     s.get("total_token_throughput", 0.0), ".2f"))
    for metric in LATENCY_METRICS:
        if f"mean_{metric}_ms" not in s:
            continue
        name, header = _SECTIONS[metric]
        out.append(f"{header:-^50}")
        out.append(_line(f"Mean {name} (ms):", s[f"mean_{metric}_ms"], ".2f"))
        out.append(_line(f"Median {name} (ms):", s[f"median_{metric}_ms"], ".2f"))
        for _, word in _percentiles(s, metric):
            out.append(_line(f"P{word} {name} (ms):", s[f"p{word}_{metric}_ms"], ".2f"))
    out.append(f"{'SLO Attainment':-^50}")
    for label, key in (("SLO attainment (%):", "slo_attainment"),
                       ("TTFT attainment (%):", "ttft_attainment"),
                       ("TPOT attainment (%):", "tpot_attainment"),
                       ("Envelope attainment (%):", "envelope_attainment")):
        out.append(_line(label, 100.0 * s.get(key, 0.0), ".2f"))
    if s.get("mean_preemptions", 0.0) is not None:     # None: not known (a client cannot see them)
        out.append(_line("Mean preemptions per request:", s.get("mean_preemptions", 0.0), ".2f"))
    out.append(_line("Rejected requests (SLO misses):", s.get("rejected", 0)))
    out.append(_line("Relegated requests:", s.get("relegated", 0)))
    for cls, cs in (s.get("per_class") or {}).items():
        n = cs.get("completed", 0) + cs.get("failed", 0)
        out.append(_line(f"  [{cls}] SLO attainment (%, n={n}):",
                         100.0 * cs.get("slo_attainment", 0.0), ".2f"))
    out.append("=" * 50)
    return "\n".join(out)


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: format(v, fmt)


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    key: str
    render: Callable[[Any], str] = str
    numeric: bool = True


DEFAULT_COLUMNS: tuple[Column, ...] = (  # short two-line headers: fits 80 columns
    Column("Policy", "policy", str, numeric=False),
    Column("Rate\nreq/s", "request_rate", _num(".2f")),
    Column("TTFT p50\nms", "median_ttft_ms", _num(".0f")),
    Column("TTFT p99\nms", "p99_ttft_ms", _num(".0f")),    # of served requests
    Column("TPOT p99\nms", "p99_tpot_ms", _num(".1f")),
    Column("SLO\natt.", "slo_attainment", _num(".1%")),   # of every request sent
    Column("Goodput\nreq/s", "request_goodput", _num(".2f")),
    Column("Rejec-\nted", "rejected", str),
    Column("Rele-\ngated", "relegated", str),
)


def summary_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column] = DEFAULT_COLUMNS,
    title: str | None = None,
) -> Table:
    """A rich Table; each row is a summary dict plus ``policy`` / ``request_rate``.
    A missing key shows as '-'."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0))
    for col in columns:
        table.add_column(col.header, justify="right" if col.numeric else "left",
                         no_wrap=True)
    for row in rows:
        table.add_row(*(
            "-" if row.get(col.key) is None else col.render(row[col.key]) for col in columns
        ))
    return table
