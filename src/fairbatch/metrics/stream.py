"""Summaries of requests fed one at a time, as they finish, in bounded memory.

``StreamingSummary.add(record, i)`` takes the ``i``-th request of a run (its index in
arrival order) whenever it is done, in any order. Records are buffered and turned into
numbers in vectorised batches (``summary._columns``): per request, a few scalars (TTFT,
TPOT, E2E, whether it met its SLO and envelope, ...) stored at its index; its token
times are dropped. ``summarize`` is this fed every record in order, so the simulator,
the engine and the HTTP benchmark client compute their summaries with one code.

Exact by construction where the old all-records summary was: the per-request numbers
sit in arrival order, so means and percentiles see the same arrays in the same order,
bit for bit. Token-level numbers (pooled ITL, peak output tokens per second) keep every
token while the run is small (``itl.EXACT_LIMIT`` gaps) and, past that, switch to
``itl.GapSketch`` per SLO class and per-second token counts (see ``summary`` for what is
then approximate; a sketched summary carries ``itl_relative_accuracy``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from fairbatch.metrics.itl import EXACT_LIMIT, RELATIVE_ACCURACY, GapSketch
from fairbatch.metrics.records import RequestRecord, record_from_request

F64 = npt.NDArray[np.float64]

# per-request columns kept for every request: name -> (dtype, fill for a missing request)
_COLUMNS: dict[str, tuple[Any, Any]] = {
    "arrival": (np.float64, np.nan), "prompt_len": (np.int64, 0), "output_len": (np.int64, 0),
    "ttft_slo": (np.float64, np.nan), "tpot_slo": (np.float64, np.nan), "success": (np.bool_, False),
    "rejected": (np.bool_, False), "relegated": (np.bool_, False), "preemptions": (np.float64, 0.0),
    "cls": (np.int32, -1), "ttft": (np.float64, np.nan), "e2e": (np.float64, np.nan),
    "tpot": (np.float64, np.nan), "end": (np.float64, np.nan), "envelope_ok": (np.bool_, False),
}
_BATCH_TOKENS = 1 << 18
_BATCH_RECORDS = 4096


class StreamingSummary:
    def __init__(self, *, exact_limit: int = EXACT_LIMIT, relative_accuracy: float = RELATIVE_ACCURACY,
                 start: float | None = None) -> None:
        """``exact_limit``: ITL gaps kept exactly before switching to sketches.
        ``start``: where the per-second token buckets begin once sketched (default: the
        earliest successful arrival seen when the switch happens)."""
        self.exact_limit = exact_limit
        self.relative_accuracy = relative_accuracy
        self.start = start
        self.cols = {k: np.full(0, fill, dtype) for k, (dtype, fill) in _COLUMNS.items()}
        self.present = np.zeros(0, np.bool_)
        self.classes: dict[str, int] = {}
        self.n = 0                       # 1 + the largest index added
        self.tok_max = -np.inf           # latest token of any request (for the duration)
        self._buf: list[tuple[int, RequestRecord]] = []
        self._buf_tokens = 0
        self._next = 0
        # exact mode: token times and gaps of successful requests, with their request index
        self._tok: list[tuple[F64, npt.NDArray[np.int64]]] = []
        self._gap: list[tuple[F64, npt.NDArray[np.int64]]] = []
        self._num_gaps = 0
        # sketched mode: per class, the gap sketch and output tokens per second from start
        self.sketched = False
        self._sketch: dict[int, GapSketch] = {}
        self._per_s: dict[int, npt.NDArray[np.int64]] = {}

    # --- feeding ---------------------------------------------------------------------------
    def add(self, record: RequestRecord, index: int | None = None) -> None:
        """Request ``index`` (default: the one after the last added) is done."""
        if index is None:
            index = self._next
        self._next = index + 1
        self._buf.append((index, record))
        self._buf_tokens += len(record.token_times)
        if self._buf_tokens >= _BATCH_TOKENS or len(self._buf) >= _BATCH_RECORDS:
            self.flush()

    def add_request(self, index: int, req) -> None:
        """A scheduler ``Request`` that left the simulator (its token times are not kept)."""
        self.add(record_from_request(req), index)

    def flush(self) -> None:
        from fairbatch.metrics.summary import _columns   # the one vectorised per-record code

        if not self._buf:
            return
        idx = np.fromiter((i for i, _ in self._buf), np.int64, len(self._buf))
        recs = [r for _, r in self._buf]
        self._buf, self._buf_tokens = [], 0
        c = _columns(recs)
        self._grow(int(idx.max()) + 1)
        if self.present[idx].any() or len(np.unique(idx)) < len(idx):
            raise ValueError("a request index was added twice")
        self.present[idx] = True
        cols = self.cols
        for name in _COLUMNS:
            if name != "cls":
                cols[name][idx] = getattr(c, name)
        codes = self.classes
        cols["cls"][idx] = np.fromiter((codes.setdefault(r.slo_class, len(codes)) for r in recs), np.int32, len(recs))
        if len(c.tok):
            self.tok_max = max(self.tok_max, float(c.tok.max()))
        ok_tok = c.success[c.tok_rec]
        ok_gap = c.success[c.gap_rec]
        tok, tok_rec = c.tok[ok_tok], idx[c.tok_rec[ok_tok]]
        gap, gap_rec = c.gap[ok_gap], idx[c.gap_rec[ok_gap]]
        if self.sketched:
            self._fold(tok, tok_rec, gap, gap_rec)
            return
        self._tok.append((tok, tok_rec))
        self._gap.append((gap, gap_rec))
        self._num_gaps += len(gap)
        if self._num_gaps > self.exact_limit:
            self._to_sketch()

    def merge(self, other: StreamingSummary) -> None:
        """Add the requests of ``other`` (other indices of the same run: a split run)."""
        other.flush()
        self.flush()
        idx = np.flatnonzero(other.present)
        if not len(idx):
            return
        self._grow(int(idx.max()) + 1)
        if self.present[idx].any():
            raise ValueError("a request index was added twice")
        self.present[idx] = True
        remap = np.full(max(len(other.classes), 1), -1, np.int32)
        for name, code in other.classes.items():
            remap[code] = self.classes.setdefault(name, len(self.classes))
        for name in _COLUMNS:
            src = other.cols[name][idx]
            self.cols[name][idx] = remap[src] if name == "cls" else src
        self.tok_max = max(self.tok_max, other.tok_max)
        if other.sketched or self.sketched:
            if self.start is None:
                self.start = other.start
            self._to_sketch()
            other._to_sketch(self.start)
            for code, sk in other._sketch.items():
                self._sketch_of(int(remap[code])).merge(sk)
            for code, counts in other._per_s.items():
                self._add_per_s(int(remap[code]), counts)
        else:
            self._tok += other._tok
            self._gap += other._gap
            self._num_gaps += other._num_gaps
            if self._num_gaps > self.exact_limit:
                self._to_sketch()

    # --- sketched mode ---------------------------------------------------------------------
    def _to_sketch(self, start: float | None = None) -> None:
        if self.sketched:
            return
        self.sketched = True
        if self.start is None:
            self.start = start
        if self.start is None:
            ok = self.present & self.cols["success"]
            self.start = float(self.cols["arrival"][ok].min()) if ok.any() else 0.0
        toks, gaps = self._tok, self._gap
        self._tok, self._gap, self._num_gaps = [], [], 0
        for (tok, tok_rec), (gap, gap_rec) in zip(toks, gaps, strict=True):
            self._fold(tok, tok_rec, gap, gap_rec)

    def _sketch_of(self, code: int) -> GapSketch:
        sk = self._sketch.get(code)
        if sk is None:
            sk = self._sketch[code] = GapSketch(self.relative_accuracy)
        return sk

    def _add_per_s(self, code: int, counts: npt.NDArray[np.int64]) -> None:
        have = self._per_s.get(code)
        if have is None or len(have) < len(counts):
            grown = np.zeros(max(len(counts), 2 * len(have) if have is not None else 0), np.int64)
            if have is not None:
                grown[: len(have)] = have
            have = self._per_s[code] = grown
        have[: len(counts)] += counts

    def _fold(self, tok: F64, tok_rec, gap: F64, gap_rec) -> None:
        cls = self.cols["cls"]
        tok_cls, gap_cls = cls[tok_rec], cls[gap_rec]
        for code in np.unique(np.concatenate([tok_cls, gap_cls])).tolist():
            self._sketch_of(code).add(gap[gap_cls == code])
            t = tok[tok_cls == code]
            if len(t):
                self._add_per_s(code, np.bincount(np.floor(np.maximum(t - self.start, 0.0)).astype(np.int64)))

    # --- storage ---------------------------------------------------------------------------
    def _grow(self, n: int) -> None:
        have = len(self.present)
        if n > have:
            cap = max(n, 2 * have, 1024)
            for name, (dtype, fill) in _COLUMNS.items():
                col = np.full(cap, fill, dtype)
                col[:have] = self.cols[name]
                self.cols[name] = col
            present = np.zeros(cap, np.bool_)
            present[:have] = self.present
            self.present = present
        self.n = max(self.n, n)

    # --- the summary -----------------------------------------------------------------------
    def summary(self, *, duration: float | None = None,
                percentiles: Sequence[float] = (50, 90, 95, 99)) -> dict[str, Any]:
        """``summarize``'s dict over every request added (indices 0..n-1, none missing)."""
        from fairbatch.metrics.summary import summarize_columns

        self.flush()
        n = self.n
        if not self.present[:n].all():
            missing = int((~self.present[:n]).sum())
            raise ValueError(f"{missing} of {n} requests were never added")
        return summarize_columns(self, duration=duration, percentiles=percentiles)

    def exact_tokens(self) -> tuple[F64, npt.NDArray[np.int64], F64, npt.NDArray[np.int64]]:
        """(token times, their request, gaps, their request), exact mode. Gaps come in
        request order, as ``summarize`` pools them (their mean and std depend on the
        order to the last bit); token times in any (they are only counted)."""
        def cat(parts):
            if not parts:
                return np.zeros(0), np.zeros(0, np.int64)
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

        tok, tok_rec = cat(self._tok)
        gap, gap_rec = cat(self._gap)
        if len(gap_rec) > 1 and not (gap_rec[1:] >= gap_rec[:-1]).all():
            order = _runs_in_order(gap_rec)   # finish order -> request order
            gap, gap_rec = gap[order], gap_rec[order]
        return tok, tok_rec, gap, gap_rec

    def class_names(self) -> list[str]:
        names = [""] * len(self.classes)
        for name, code in self.classes.items():
            names[code] = name
        return names


def _runs_in_order(rec: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The permutation that sorts ``rec`` (runs of one request each, requests unique) by
    request, keeping each run's order: one sort of the runs, not of every element."""
    starts = np.concatenate([[0], np.flatnonzero(rec[1:] != rec[:-1]) + 1])
    lengths = np.diff(np.append(starts, len(rec)))
    by_request = np.argsort(rec[starts], kind="stable")
    lens = lengths[by_request]
    # the k-th element of the output is element j of run r: starts[r] + j
    first = np.repeat(starts[by_request] - (np.cumsum(lens) - lens), lens)
    return first + np.arange(len(rec), dtype=np.int64)
