"""Reading a server's Prometheus ``/metrics`` page with prometheus_client's own text
parser (not by splitting lines: label values may hold spaces, braces and escapes)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: str) -> list[Sample]:
    """Every sample on the page, each with its full name (a counter gives ``NAME_total``
    and ``NAME_created``), labels and value. Raises ValueError on a malformed page."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]
