"""Forwarding one request: choose a backend, try it (``attempt.py``), and on ``Retry`` the
next one the policy picks among those not tried; each backend at most once. When every
backend refused the request (429), the router answers 429 itself (``Retry-After``, the
reason in ``x-llm-d-request-dropped-reason``); when none could take it, 503."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fairbatch.cluster.router.attempt import attempt
from fairbatch.cluster.router.config import RouterConfig
from fairbatch.cluster.router.failures import ClientGone, Retry
from fairbatch.cluster.router.prompt_estimate import estimate_prompt_tokens
from fairbatch.cluster.router.prompt_hashes import prompt_hashes
from fairbatch.cluster.router.relay import StartedStream
from fairbatch.cluster.router.state import RouterState
from fairbatch.server.disconnect import wait_disconnect
from fairbatch.server.errors import error_response
from fairbatch.wire.errors import DROPPED_REASON_HEADER

log = logging.getLogger("fairbatch.router")

_FORWARD_REQUEST_HEADERS = ("content-type", "authorization", "accept", "x-request-id", "openai-organization",
                            "openai-project", "user-agent")
ALL_REFUSED_REASON = "rejected-saturated"   # llm-d's word, for 429s that gave no reason of their own


async def _read_body(request: Request, limit: int) -> tuple[bytes, dict[str, Any]] | Response:
    """The body and its JSON object, or the 413 / 400 to answer: the router reads the body
    to route it (its prompt length, whether it streams)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return error_response(413, f"request body larger than {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        return error_response(413, f"request body larger than {limit} bytes")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return error_response(400, f"request body is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return error_response(400, "request body must be a JSON object")
    return body, obj


async def forward(state: RouterState, request: Request) -> Response:
    arrival = time.perf_counter()
    path = request.url.path
    read = await _read_body(request, state.config.max_body_bytes)
    if isinstance(read, Response):
        return read
    body, obj = read
    stream = obj.get("stream") is True
    prompt_len = estimate_prompt_tokens(path, obj)
    router = state.router
    hashes = prompt_hashes(path, obj, router.block_size) if router.reads_prefix else None
    headers = backend_headers(state.config, request)
    headers.setdefault("content-type", "application/json")
    query = request.url.query
    gone = asyncio.ensure_future(wait_disconnect(request))
    tried: set[int] = set()
    reasons: list[str] = []
    last: Retry | None = None
    refusals: list[Retry] = []
    try:
        while True:
            b = state.choose(prompt_len, tried, hashes)
            if b is None:
                break
            tried.add(b.index)
            url = b.url + path + (f"?{query}" if query else "")
            b.inflight += 1
            b.inflight_unstarted += 1
            b.inflight_tokens += prompt_len
            handed_over = False
            try:
                resp = await attempt(state, b, url, body, headers, stream, gone, prompt_len)
                handed_over = isinstance(resp, StartedStream)
                state.metrics.first_output_seconds.observe(time.perf_counter() - arrival)
                if not handed_over:
                    state.metrics.requests.labels(b.url, str(resp.status_code)).inc()
                return resp
            except Retry as e:
                state.metrics.retries.labels(b.url, e.reason).inc()
                reasons.append(f"{b.url}: {e.detail}")
                last = e
                if e.refused:
                    refusals.append(e)     # routine under overload: no log line for each
                log.log(logging.DEBUG if e.refused else logging.INFO, "request moved off %s: %s", b.url, e.detail)
            finally:
                if not handed_over:
                    b.inflight -= 1
                    b.inflight_unstarted -= 1
                    b.inflight_tokens -= prompt_len
    except ClientGone:
        state.metrics.requests.labels("none", "499").inc()
        return error_response(499, "client disconnected")
    finally:
        if not gone.done():
            gone.cancel()
    if refusals and len(refusals) == len(tried):
        state.metrics.requests.labels("none", "429").inc()
        return all_refused(refusals, reasons)
    if last is not None and last.response is not None:
        state.metrics.requests.labels("none", str(last.response.status_code)).inc()
        return last.response
    state.metrics.requests.labels("none", "503").inc()
    if not reasons:
        down = "; ".join(f"{b.url}: {b.error}" for b in state.backends)
        return error_response(503, f"no healthy backend ({down})", headers={"Retry-After": "1"})
    return error_response(503, "no backend could take the request: " + "; ".join(reasons), headers={"Retry-After": "1"})


def all_refused(refusals: Sequence[Retry], reasons: Sequence[str]) -> JSONResponse:
    """The router's own 429 once every backend refused the request: the shortest
    ``Retry-After`` any of them asked for, and the reason they gave."""
    waits: list[int] = []
    why = ""
    for r in refusals:
        h = r.response.headers if r.response is not None else {}
        ra = h.get("retry-after", "")
        if ra.isdigit():
            waits.append(int(ra))
        why = h.get(DROPPED_REASON_HEADER) or why
    why = why or ALL_REFUSED_REASON
    return error_response(429, f"every backend refused the request ({why}): " + "; ".join(reasons),
                          headers={"Retry-After": str(min(waits) if waits else 1), DROPPED_REASON_HEADER: why})


def backend_headers(cfg: RouterConfig, request: Request) -> dict[str, str]:
    """The client's headers worth forwarding; with ``backend_api_key`` the router speaks to
    the backends with its own key (the client's, checked here, may not be theirs)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_REQUEST_HEADERS}
    if cfg.backend_api_key:
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        headers["authorization"] = f"Bearer {cfg.backend_api_key}"
    return headers
