"""Readers for the public LLM-serving trace formats.

Formats (detected from the header line, or a ``.jsonl`` name / a leading ``{``):

- ``azure``: Azure LLM inference 2023 CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``,
  absolute timestamps with 100 ns resolution (``2023-11-16 18:17:03.9799600``).
- ``vidur``: Vidur / Splitwise CSV ``arrived_at,num_prefill_tokens,num_decode_tokens``,
  seconds from the start.
- ``lengths``: lengths-only CSV ``num_prefill_tokens,num_decode_tokens,...`` (Sarathi-Serve /
  Vidur ShareGPT and arXiv files). No arrival times: entries get arrival 0.0 and
  ``TraceFile.timed`` is False; an arrival process must time them.
- ``mooncake``: Mooncake / vLLM timed-trace / SGLang JSONL, one object per line with
  ``timestamp`` (ms), ``input_length``, ``output_length``, and optionally ``hash_ids``
  (one id per 512-token prompt block, Mooncake's shared-prefix names; kept in
  ``TraceEntry.hash_ids``).
- ``burstgpt``: BurstGPT CSV ``Timestamp,...,Request tokens,Response tokens,...,Log Type``
  (both the ``_1`` and the ``_3`` layout); ``Log Type`` becomes the tag; rows with 0
  request or 0 response tokens are failed requests and are skipped.

Column names are matched case-insensitively and in any order. Timed traces must not go
backwards in time (an out-of-order row is more likely corruption than intent).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .trace import TraceEntry, TraceError

AZURE = "azure"
VIDUR = "vidur"
LENGTHS = "lengths"
MOONCAKE = "mooncake"
BURSTGPT = "burstgpt"
FORMATS = (AZURE, VIDUR, LENGTHS, MOONCAKE, BURSTGPT)

# (time column or None, prompt column, output column) per CSV format. Detection tries them
# in this order: vidur's columns are a superset of the lengths-only ones.
_CSV_COLUMNS: dict[str, tuple[str | None, str, str]] = {
    AZURE: ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    VIDUR: ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
    BURSTGPT: ("Timestamp", "Request tokens", "Response tokens"),
    LENGTHS: (None, "num_prefill_tokens", "num_decode_tokens"),
}
_BURSTGPT_TAG = "Log Type"
_JSONL_KEYS = ("timestamp", "input_length", "output_length")

# Time units per second for each timed format; times are kept exact (ints where the
# source is) until the offset from the first arrival is taken.
_PER_SECOND = {AZURE: 1_000_000_000, VIDUR: 1, BURSTGPT: 1, MOONCAKE: 1000}


@dataclass(frozen=True, slots=True)
class TraceFile:
    """What a trace file holds: its entries (sorted by arrival) and how it was read."""

    entries: list[TraceEntry]
    format: str
    timed: bool          # False for lengths-only files: every arrival is 0.0
    skipped: int = 0     # rows dropped as failed requests (BurstGPT zero-token rows)


def read_trace(path: str | os.PathLike[str], *, label: str | None = None) -> TraceFile:
    """Read any supported trace file; ``label`` is the name error messages use."""
    label = label if label is not None else os.fspath(path)
    try:
        with _open(path, label) as f:
            first = f.readline()
            if not first:
                raise TraceError(label, 1, "file is empty")
            f.seek(0)
            if Path(path).suffix.lower() == ".jsonl" or first.lstrip().startswith("{"):
                return _read_jsonl(f, label)
            return _read_csv(f, label)
    except UnicodeDecodeError as e:
        raise TraceError(label, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def detect_format(path: str | os.PathLike[str], *, label: str | None = None) -> str:
    """The format name of a trace file, from its name and header line."""
    label = label if label is not None else os.fspath(path)
    with _open(path, label) as f:
        first = f.readline()
    if not first:
        raise TraceError(label, 1, "file is empty")
    if Path(path).suffix.lower() == ".jsonl" or first.lstrip().startswith("{"):
        return MOONCAKE
    header = next(csv.reader([first]))
    return _csv_format(header, label)[0]


# --- CSV ------------------------------------------------------------------------------------
def _csv_format(header: list[str], label: str) -> tuple[str, list[int]]:
    """Format of a CSV header and the indices of its (time, prompt, output) columns."""
    index = {name.strip().lower(): i for i, name in enumerate(header)}
    for fmt, columns in _CSV_COLUMNS.items():
        if all(c is None or c.lower() in index for c in columns):
            return fmt, [-1 if c is None else index[c.lower()] for c in columns]
    known = "; ".join(",".join(c for c in cols if c) for cols in _CSV_COLUMNS.values())
    raise TraceError(label, 1, f"unknown header {','.join(header)!r}: expected columns {known}, "
                               f"or a .jsonl file with {', '.join(_JSONL_KEYS)}")


def _read_csv(f: IO[str], label: str) -> TraceFile:
    reader = csv.reader(f)
    header = next(reader)
    fmt, (t_col, p_col, o_col) = _csv_format(header, label)
    t_name, p_name, o_name = _CSV_COLUMNS[fmt]
    tag_col = next((i for i, h in enumerate(header) if h.strip().lower() == _BURSTGPT_TAG.lower()),
                   None) if fmt == BURSTGPT else None
    parse_time: Callable[[str, str, str, int], int | float] = (
        _timestamp_ns if fmt == AZURE else _seconds)
    width = len(header)

    rows: list[tuple[int | float, int, int, str | None]] = []
    prev: int | float | None = None
    prev_text = ""
    skipped = 0
    for row in reader:
        line = reader.line_num
        if not row:                       # blank line (e.g. a trailing newline pair)
            continue
        if len(row) != width:
            raise TraceError(label, line, f"expected {width} fields ({','.join(header)}), "
                                          f"got {len(row)}")
        t: int | float = 0.0
        if t_name is not None:
            t = parse_time(row[t_col], t_name, label, line)
            if prev is not None and t < prev:
                raise TraceError(label, line, f"{t_name} goes backwards: {row[t_col].strip()!r} "
                                              f"is earlier than {prev_text!r} on the row before")
            prev, prev_text = t, row[t_col].strip()
        prompt = _length(row[p_col], p_name, label, line)
        output = _length(row[o_col], o_name, label, line)
        if fmt == BURSTGPT and (prompt == 0 or output == 0):
            skipped += 1                  # BurstGPT logs failed requests with 0 tokens
            continue
        _check_nonzero(prompt, p_name, label, line)
        _check_nonzero(output, o_name, label, line)
        tag = (row[tag_col].strip() or None) if tag_col is not None else None
        rows.append((t, prompt, output, tag))
    return _finish(rows, fmt, label, skipped)


# --- JSONL ----------------------------------------------------------------------------------
def _read_jsonl(f: Iterable[str], label: str) -> TraceFile:
    rows: list[tuple[int | float, int, int, str | None]] = []
    hashes: list[tuple[int, ...] | None] = []
    prev: int | float | None = None
    for line, text in enumerate(f, start=1):
        if not text.strip():
            continue
        try:
            obj: Any = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(label, line, f"bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TraceError(label, line, f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in _JSONL_KEYS if k not in obj]
        if missing:
            raise TraceError(label, line, f"missing key(s) {', '.join(missing)}")
        t = obj["timestamp"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise TraceError(label, line, f"timestamp is not a number: {t!r}")
        if prev is not None and t < prev:
            raise TraceError(label, line, f"timestamp goes backwards: {t!r} after {prev!r}")
        prev = t
        prompt = _json_length(obj["input_length"], "input_length", label, line)
        output = _json_length(obj["output_length"], "output_length", label, line)
        rows.append((t, prompt, output, None))
        hashes.append(_hash_ids(obj.get("hash_ids"), label, line))
    trace = _finish(rows, MOONCAKE, label, 0)
    if any(h is not None for h in hashes):
        trace.entries[:] = [replace(e, hash_ids=h) for e, h in zip(trace.entries, hashes, strict=True)]
    return trace


# --- fields ---------------------------------------------------------------------------------
def _hash_ids(value: object, label: str, line: int) -> tuple[int, ...] | None:
    """Mooncake's ``hash_ids``: a list of ints (absent or null: no prefix information)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
        raise TraceError(label, line, f"hash_ids is not a list of integers: {_short(value)}")
    return tuple(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _length(text: str, column: str, label: str, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        # Accept "12.0" (some exports write lengths as floats), nothing fractional.
        try:
            as_float = float(text)
        except ValueError:
            as_float = math.nan
        if not as_float.is_integer():
            raise TraceError(label, line, f"{column} is not an integer: {text!r}") from None
        value = int(as_float)
    if value < 0:
        raise TraceError(label, line, f"{column} is negative: {value}")
    return value


def _json_length(value: object, key: str, label: str, line: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(label, line, f"{key} is not an integer: {value!r}")
    if value < 0:
        raise TraceError(label, line, f"{key} is negative: {value}")
    _check_nonzero(value, key, label, line)
    return value


def _check_nonzero(value: int, column: str, label: str, line: int) -> None:
    # A request needs a prompt token to prefill and at least one token to generate.
    if value == 0:
        raise TraceError(label, line, f"{column} is 0: a request needs at least one token")


def _seconds(text: str, column: str, label: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(label, line, f"{column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise TraceError(label, line, f"{column} is not finite: {text!r}")
    return value


def _timestamp_ns(text: str, column: str, label: str, line: int) -> int:
    """Nanoseconds since 0001-01-01 of an ISO timestamp, exact to 100 ns and fast.

    datetime keeps microseconds only, so the fractional digits are taken apart; for
    the common ``YYYY-MM-DD HH:MM:SS.fffffff`` this costs one C-level fromisoformat.
    """
    s = text.strip()
    head, dot, frac = s.partition(".")
    try:
        if dot and frac.isascii() and frac.isdigit() and len(frac) <= 9:
            dt = datetime.fromisoformat(head)
            ns = int(frac.ljust(9, "0"))
        else:                              # no fraction, or a timezone after it
            dt = datetime.fromisoformat(s)
            ns = dt.microsecond * 1000
    except ValueError:
        raise TraceError(label, line, f"{column} is not a timestamp: {text!r}") from None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    seconds = dt.toordinal() * 86400 + dt.hour * 3600 + dt.minute * 60 + dt.second
    return seconds * 1_000_000_000 + ns


# --- common ---------------------------------------------------------------------------------
def _open(path: str | os.PathLike[str], label: str) -> IO[str]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise TraceError(label, None, "no such file") from None
    except IsADirectoryError:
        raise TraceError(label, None, "is a directory, not a trace file") from None
    except OSError as e:
        raise TraceError(label, None, f"cannot open: {e.strerror or e}") from None


def _finish(rows: list[tuple[int | float, int, int, str | None]], fmt: str, label: str,
            skipped: int) -> TraceFile:
    if not rows:
        why = f" ({skipped} failed rows skipped)" if skipped else ""
        raise TraceError(label, None, f"no requests in the file{why}")
    timed = fmt != LENGTHS
    if timed:
        t0 = rows[0][0]
        per_second = _PER_SECOND[fmt]
        # Offsets are taken in the source's own units (exact for integer timestamps).
        entries = [TraceEntry((t - t0) / per_second, p, o, tag) for t, p, o, tag in rows]
    else:
        entries = [TraceEntry(0.0, p, o, tag) for _, p, o, tag in rows]
    return TraceFile(entries, fmt, timed, skipped)
