"""One benchmark request against an OpenAI-compatible ``/v1/completions``: stream it, time
every token's arrival, and turn it into a ``metrics.RequestRecord``. The HTTP client is
aiohttp's (``open_session``), as ``vllm bench serve``'s; one client process reads every
token event of every stream, and aiohttp costs about half of httpx's CPU per event, which
otherwise queues first tokens in the client's loop and inflates the TTFT it reports
(docs/PERFORMANCE.md, "Served stack").

Timing follows ``vllm bench serve`` (``async_request_openai_completions``): the clock
starts right before the POST; every SSE event that carries ``choices`` is a token
arrival (its time is when the client read it); TTFT is the first, the end is the last.
The output length is the server's ``usage.completion_tokens`` (``stream_options.
include_usage``), falling back to the number of events. Where a server packs several
tokens into one event, the missing arrival times repeat the last event's time (the
records module's convention); where it sends a final event without a token, the extra
time is dropped.

A request fails, with its reason, on: an HTTP error status, a transport error or
timeout, an ``error`` event in the stream, a stream that ends without ``[DONE]``, or
(``ignore_eos``) fewer tokens than asked for. Nothing is dropped silently. A 429 (the
server's scheduler refused the request: ``late=reject``, it could not meet its TTFT) is
not a generic failure: its record's error is ``metrics.records.REJECTED``, which the
summary counts as ``rejected`` (and attainment as a miss).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from fairbatch.metrics import RequestRecord
from fairbatch.metrics.records import REJECTED
from fairbatch.request import SLO
from fairbatch.wire import sse
from fairbatch.wire.errors import describe_error, error_message

clock = time.perf_counter


@dataclass(slots=True)
class BenchRequest:
    """One request to send: token-id prompt, exact output length, its SLO (class)."""

    request_id: str
    arrival: float                 # seconds after the benchmark start
    prompt_ids: list[int]
    output_len: int
    slo: SLO

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def make_payload(req: BenchRequest, model: str, *, send_slo: bool = True, ignore_eos: bool = True,
                 extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt_ids,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if send_slo:
        body["slo"] = {"ttft_ms": req.slo.ttft * 1e3, "tpot_ms": req.slo.tpot * 1e3, "class": req.slo.name}
        # The same SLO where vLLM carries per-request extra args, for fairbatch's vLLM plugin
        # (docs/VLLM.md); servers that know neither field ignore both.
        body["vllm_xargs"] = {"ttft_slo": req.slo.ttft, "tpot_slo": req.slo.tpot, "slo_class": req.slo.name}
    if extra_body:
        body.update(extra_body)
    return body


CONNECT_TIMEOUT = 60.0


def open_session(timeout: float, max_connections: int | None = None) -> aiohttp.ClientSession:
    """The streaming client of one bench process, aiohttp's (as ``vllm bench serve``'s);
    open it inside the running loop. ``timeout`` bounds a whole request, as vLLM's does
    (getting a connection: at most 60 s of it); a timer per request, not one per read,
    which would cost every token event a few microseconds. ``max_connections``: None for
    no limit. ``trust_env``: an HTTP(S) proxy the environment names for the host is used
    (``http_proxy``, ``https_proxy``, ``no_proxy``), as httpx and curl use it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections or 0),
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        trust_env=True)


async def send_request(client: aiohttp.ClientSession, url: str, req: BenchRequest, payload: dict[str, Any],
                       *, check_length: bool = True, events: dict[str, list[float]] | None = None,
                       cached: dict[str, int] | None = None) -> RequestRecord:
    """POST ``payload`` to ``url`` and stream the answer into a RequestRecord. ``events``:
    where to keep the arrival time of every event with ``choices`` (by request id), for
    ITLs counted per event as vLLM counts them. ``cached``: where to keep the prompt
    tokens the server says it found cached (``usage.prompt_tokens_details.cached_tokens``,
    OpenAI's field; vLLM sends it with ``--enable-prompt-tokens-details``), when it says."""
    times: list[float] = []
    if events is not None:
        events[req.request_id] = times
    usage_tokens: int | None = None
    done = False
    error: str | None = None
    start = clock()
    try:
        async with client.post(url, json=payload) as resp:
            if resp.status == 429:
                await resp.read()
                error = REJECTED
            elif resp.status != 200:
                body = await resp.read()
                error = f"HTTP {resp.status}: {describe_error(body)}"
            else:
                async for line in sse.lines(resp.content.iter_any()):
                    now = clock()
                    data = sse.data_payload(line)
                    if data is None:
                        continue          # blank separators, comments, event: lines
                    if data == sse.DONE:
                        done = True
                        break
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError:
                        error = f"bad SSE data: {data[:80]!r}"
                        break
                    if not isinstance(obj, dict):
                        continue
                    if obj.get("error") is not None:
                        error = f"server error in stream: {str(error_message(obj))[:200]}"
                        break
                    if obj.get("choices"):
                        times.append(now)
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        if isinstance(usage.get("completion_tokens"), int):
                            usage_tokens = usage["completion_tokens"]
                        n_cached = cached_tokens(usage)
                        if cached is not None and n_cached is not None:
                            cached[req.request_id] = n_cached
                if error is None and not done:
                    error = "stream ended without [DONE]"
    except TimeoutError as e:         # aiohttp's timeouts (the request's, the connection's) are TimeoutErrors
        error = f"timeout: {type(e).__name__}"
    except aiohttp.ClientError as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except OSError as e:
        error = f"{type(e).__name__}: {e}"

    produced = usage_tokens if usage_tokens is not None else len(times)
    if error == REJECTED:
        produced = 0
    if error is None and produced == 0:
        error = "no tokens received"
    if error is None and check_length and produced < req.output_len:
        error = f"short output: {produced} of {req.output_len} tokens"
    token_times = _token_times(times, produced)
    return RequestRecord(
        request_id=req.request_id,
        arrival=start,
        prompt_len=req.prompt_len,
        output_len=produced,
        ttft_slo=req.slo.ttft,
        tpot_slo=req.slo.tpot,
        slo_class=req.slo.name,
        first_token_time=times[0] if times else None,
        token_times=token_times,
        finish_time=times[-1] if times else None,
        success=error is None,
        error=error,
    )


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens``, or None when the server does not say."""
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _token_times(event_times: list[float], n_tokens: int) -> np.ndarray:
    """One time per token: event times, the last repeated if the server sent fewer events
    than tokens, cut if it sent more (a closing event with no token)."""
    t = np.asarray(event_times, dtype=np.float64)
    if n_tokens <= 0 or len(t) == 0:
        return np.zeros(0)
    if len(t) >= n_tokens:
        return t[:n_tokens].copy()
    return np.concatenate([t, np.full(n_tokens - len(t), t[-1])])
