"""Per-request records -> vLLM-compatible summaries, SLO attainment, capacity search,
reports and plots. Shared by the simulator, the engine and the HTTP benchmark client."""

from fairbatch.metrics.capacity import CapacityResult, find_capacities, find_capacity, request_rate_of
from fairbatch.metrics.records import RequestRecord, record_from_request
from fairbatch.metrics.report import DEFAULT_COLUMNS, Column, format_summary_block, summary_table
from fairbatch.metrics.summary import (
    DEFAULT_PERCENTILES,
    SLO_KEYS,
    percentile_key,
    summarize,
    vllm_keys,
)

_PLOTS = ("plot_attainment_vs_rate", "plot_metric_vs_rate", "plot_ttft_cdf")


def __getattr__(name: str) -> object:
    # Plots import matplotlib (~0.3 s); load it only when a plot is asked for.
    if name in _PLOTS:
        from fairbatch.metrics import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_COLUMNS",
    "DEFAULT_PERCENTILES",
    "SLO_KEYS",
    "CapacityResult",
    "Column",
    "RequestRecord",
    "find_capacities",
    "find_capacity",
    "format_summary_block",
    "percentile_key",
    "plot_attainment_vs_rate",
    "plot_metric_vs_rate",
    "plot_ttft_cdf",
    "record_from_request",
    "request_rate_of",
    "summarize",
    "summary_table",
    "vllm_keys",
]
