"""Per-request measurement records: the one shape every substrate reports in.

The simulator converts its ``Request`` objects with :func:`record_from_request`; the HTTP
benchmark client builds records from streamed responses. Both then go through the same
:func:`fairbatch.metrics.summarize`, so one trace through both gives comparable JSON.

Definitions follow ``vllm bench serve`` (vllm/benchmarks/serve.py, ``calculate_metrics``):
TTFT = first token - arrival; E2E = finish - arrival; TPOT = (E2E - TTFT) / (output_len - 1)
only when output_len > 1; ITL = gaps between consecutive output tokens. What meets the SLO
is decided here once (:func:`vllm_tpot`, :func:`slo_met`, :func:`envelope_deadline`), on scalars
or arrays, for every place that counts attainment: the records below, the vectorised
summaries (``summary``, ``stream``), the server's Prometheus counters and the vLLM plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fairbatch.request import Request, RequestState

FloatArray = npt.NDArray[np.float64]

REJECTED = "rejected"   # the error of a request the scheduler refused (late=reject, HTTP 429)


def vllm_tpot(ttft, e2e, output_len):
    """vLLM's TPOT, (E2E - TTFT) / (output_len - 1); NaN where output_len <= 1 or a time is
    NaN. Scalars (a 0-d array back) or arrays."""
    n = np.asarray(output_len)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 1, (np.asarray(e2e, np.float64) - ttft) / (n - 1), np.nan)


def slo_met(success, ttft, tpot, ttft_slo, tpot_slo):
    """(TTFT met, TPOT met), scalars or arrays. A failed request meets neither; no first
    token (NaN TTFT) misses TTFT; no TPOT (NaN: one output token) meets TPOT, as vLLM
    counts it 0. The SLO is met when both are."""
    return success & np.less_equal(ttft, ttft_slo), success & ~np.greater(tpot, tpot_slo)


def envelope_deadline(arrival, ttft_slo, tpot_slo, j):
    """Deadline of output token ``j`` (from 0) under FairBatching's per-token envelope."""
    return arrival + ttft_slo + tpot_slo * j


def _nan(x: float | None) -> float:
    return np.nan if x is None else x


def _empty() -> FloatArray:
    return np.zeros(0, dtype=np.float64)


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are absolute seconds on one clock.

    ``token_times`` holds one entry per output token; a client whose stream chunks carry
    several tokens repeats the chunk's time for each (zero ITLs, as vLLM would count
    them only if it saw them). ``output_len`` (TPOT's denominator) is the produced count.
    """

    request_id: str
    arrival: float
    prompt_len: int
    output_len: int                       # output tokens actually produced
    ttft_slo: float                       # seconds
    tpot_slo: float                       # seconds
    slo_class: str = "default"
    first_token_time: float | None = None
    token_times: FloatArray = field(default_factory=_empty)  # every output token's time
    finish_time: float | None = None
    success: bool = True
    error: str | None = None              # REJECTED for a request the server refused (429)
    num_preemptions: int = 0
    relegated: bool = False               # put behind the requests on time (late=relegate|reject)

    @property
    def rejected(self) -> bool:
        return self.error == REJECTED

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival

    @property
    def end_time(self) -> float | None:
        """Finish time; falls back to the last token's time when the source gave none."""
        if self.finish_time is not None:
            return self.finish_time
        if len(self.token_times):
            return float(self.token_times[-1])
        return None

    @property
    def e2e(self) -> float | None:
        end = self.end_time
        return None if end is None else end - self.arrival

    @property
    def tpot(self) -> float | None:
        """vLLM's TPOT (:func:`vllm_tpot`): mean time per output token after the first; None if
        <= 1 token."""
        t = float(vllm_tpot(_nan(self.ttft), _nan(self.e2e), self.output_len))
        return None if np.isnan(t) else t

    @property
    def itls(self) -> FloatArray:
        return np.diff(np.asarray(self.token_times, dtype=np.float64))

    def _slo_met(self) -> tuple[bool, bool]:
        ttft_ok, tpot_ok = slo_met(self.success, _nan(self.ttft), _nan(self.tpot), self.ttft_slo, self.tpot_slo)
        return bool(ttft_ok), bool(tpot_ok)

    @property
    def meets_ttft(self) -> bool:
        return self._slo_met()[0]

    @property
    def meets_tpot(self) -> bool:
        return self._slo_met()[1]

    @property
    def meets_slo(self) -> bool:
        """Both TTFT and vLLM-style mean TPOT within the SLO, and the request succeeded."""
        return all(self._slo_met())

    @property
    def meets_envelope(self) -> bool:
        """Every token j arrived by arrival + ttft_slo + tpot_slo * j (FairBatching's
        per-token deadlines). Stricter per token, but not implied by meets_slo nor vice
        versa: an early first token lets later tokens run late on mean TPOT yet stay
        inside the envelope, and one late token breaks the envelope while the mean holds.
        """
        t = np.asarray(self.token_times, dtype=np.float64)
        if not self.success or len(t) == 0:
            return False
        return bool(np.all(t <= envelope_deadline(self.arrival, self.ttft_slo, self.tpot_slo, np.arange(len(t)))))


def record_from_request(req: Request) -> RequestRecord:
    """Snapshot a scheduler ``Request`` (finished, aborted or still in flight)."""
    times = np.array(np.frombuffer(req.token_times, dtype=np.float64))  # copy off the buffer
    finished = req.state is RequestState.FINISHED and req.finish_reason != "abort"
    if finished:
        error = None
    elif req.state is RequestState.REJECTED:
        error = REJECTED
    elif req.state is RequestState.ABORTED or req.finish_reason == "abort":
        error = "aborted"
    else:
        error = f"unfinished ({req.state.value})"
    return RequestRecord(
        request_id=req.request_id,
        arrival=req.arrival,
        prompt_len=req.prompt_len,
        output_len=req.generated,
        ttft_slo=req.slo.ttft,
        tpot_slo=req.slo.tpot,
        slo_class=req.slo.name,
        first_token_time=req.first_token_time,
        token_times=times,
        finish_time=req.finish_time,
        success=finished,
        error=error,
        num_preemptions=req.num_preemptions,
        relegated=req.relegated,
    )
