"""``load_trace``: the one entry point from a trace name or file to timed requests.

Bundled traces (in ``fairbatch/workload/data/``, sources and licences in its NOTICE): the
Azure LLM inference traces 2023 (Azure/AzurePublicDataset, CC-BY-4.0; cite Patel et al.,
"Splitwise", ISCA 2024) and Mooncake's synthetic trace (kvcache-ai/Mooncake, Apache-2.0;
cite Qin et al., "Mooncake", FAST 2025), which names shared prompt prefixes (``hash_ids``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .arrivals import ArrivalProcess, retime
from .readers import TraceFile, read_trace
from .sessions import multi_turn_trace
from .trace import TraceEntry, TraceError

# name -> (file in data/, description)
_BUNDLED: dict[str, tuple[str, str]] = {
    "azure-conv": (
        "AzureLLMInferenceTrace_conv.csv",
        ("Azure LLM inference 2023, conversation service: 19,366 requests over ~1 h "
         "(5.5 req/s), prompt mean 1155 tokens, output mean 211"),
    ),
    "azure-code": (
        "AzureLLMInferenceTrace_code.csv",
        ("Azure LLM inference 2023, coding service: 8,819 requests over ~1 h (2.6 req/s, "
         "very bursty: inter-arrival CV 13), prompt mean 2048 tokens, output mean 28"),
    ),
    "mooncake": (
        "mooncake_synthetic_trace.jsonl",
        ("Mooncake (FAST'25) synthetic trace: 3,993 requests over ~17 min (3.9 req/s, Poisson), "
         "prompt mean 15,325 tokens (max 191k), output mean 149; shared prefixes as 512-token hash ids"),
    ),
}


# generated, not read: name -> description (seeded by load_trace's seed)
_SYNTHETIC: dict[str, str] = {
    "multi-turn": ("synthetic multi-turn chat (workload/sessions.py): 1,000 sessions at 0.5/s of 2-8 turns, "
                   "each prompt the last one + its answer + a new message after a shared 1,024-token system "
                   "prompt; ~5,000 requests, 512-token hash ids"),
}


def bundled_traces() -> dict[str, str]:
    """Names ``load_trace`` accepts without a path, with a one-line description."""
    return {**{name: description for name, (_, description) in _BUNDLED.items()}, **_SYNTHETIC}


def load_trace(
    source: str | os.PathLike[str],
    *,
    arrival: ArrivalProcess | None = None,
    num_requests: int | None = None,
    seed: int = 0,
) -> list[TraceEntry]:
    """Read a trace (a bundled name or a file path) into entries sorted by arrival.

    ``num_requests`` keeps the first n requests (in file order). ``arrival`` re-times them
    with that process (seeded by ``seed``); lengths-only traces need one. A ``str`` that is
    a bundled name means the bundled trace; pass a ``Path`` for a local file of that name.
    """
    if isinstance(source, str) and source in _SYNTHETIC:
        trace, label = TraceFile(multi_turn_trace(seed=seed), "synthetic", True), source
    elif isinstance(source, str) and source in _BUNDLED:
        filename = _BUNDLED[source][0]
        data = resources.files("fairbatch.workload").joinpath("data", filename)
        with resources.as_file(data) as path:
            trace = read_trace(path, label=filename)
        label = filename
    else:
        label = os.fspath(source)
        if not Path(source).exists() and not isinstance(source, Path) and os.sep not in label:
            # Probably a mistyped bundled name rather than a path.
            raise TraceError(label, None, f"no such file, and not a bundled trace "
                                          f"({', '.join(bundled_traces())})")
        trace = read_trace(source, label=label)

    entries = trace.entries
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        if num_requests > len(entries):
            raise TraceError(label, None, f"asked for {num_requests} requests but the trace "
                                          f"has only {len(entries)}")
        entries = entries[:num_requests]
    if arrival is not None:
        return retime(entries, arrival, seed)
    if not trace.timed:
        raise TraceError(label, None, "has request lengths but no arrival times: give an "
                                      "arrival process (--request-rate R [--burstiness B] on "
                                      "the command line, or arrival=PoissonArrivals(R))")
    return entries
