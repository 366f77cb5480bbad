"""The OpenAI-compatible FastAPI app: ``build_app(model)``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE
streaming and ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /load`` (the scheduler's load estimate, for routers),
``GET /profile`` (the scheduler's current step-time model, loadable by the simulator),
and vLLM's ``/tokenize``, ``/detokenize``, ``/version``, ``/ping`` (``vllm_routes.py``).
Request fields and answers are vLLM's: its sampling parameters (``sampling.py``),
logprob shapes (``logprobs.py``), ``stop_reason``; fields it cannot honour are 400s
(``unsupported.py``).

Robustness rules: every request is validated before it reaches the engine (bad body,
unknown model, over-long prompt -> 400/404 in OpenAI's error format); a full server
answers 503 with ``Retry-After``; a request the scheduler refuses (``late=reject``: it can
no longer meet its TTFT) is answered 429 with ``Retry-After`` and the reason in
``x-llm-d-request-dropped-reason``, streamed or not: a stream's status and headers are
sent only once its first output (or its refusal) exists; a client that goes away has its
requests aborted at once (their KV blocks freed at the engine's next step boundary); any
unexpected error in a handler is one request's 500, never the server's end.

Where each part lives: the handlers in ``completions.py`` and ``chat.py``, sharing
``serving.py`` (the engine and the limits) and ``request_builder.py`` (body -> engine
requests, every check); the engine's deltas become text in ``choice_stream.py`` and
events in ``sse_stream.py`` (one streaming loop for both endpoints); ``info_routes.py``
answers the rest.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fairbatch.server.access import AccessControl, protected_paths
from fairbatch.server.async_engine import AsyncEngine
from fairbatch.server.body_limit import DEFAULT_BODY_TIMEOUT, BodyLimit, body_limit
from fairbatch.server.body_precheck import LargeBodyCheck, max_json_values
from fairbatch.server.chat import create_chat_completion
from fairbatch.server.completions import create_completion
from fairbatch.server.errors import APIError, error_response, format_validation_errors
from fairbatch.server.info_routes import add_info_routes
from fairbatch.server.metrics import ServerMetrics
from fairbatch.server.model import ServedModel
from fairbatch.server.openapi import document_errors
from fairbatch.server.protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from fairbatch.server.serving import Serving
from fairbatch.server.vllm_routes import add_vllm_routes

log = logging.getLogger("fairbatch.server")


def build_app(model: ServedModel, *, backend: Any = None, max_pending: int = 4096, retry_after: int = 1,
              metrics_prefix: str = "fairbatch", max_body_bytes: int | None = None,
              body_timeout: float | None = DEFAULT_BODY_TIMEOUT, max_choices: int = MAX_CHOICES,
              default_max_tokens: int | None = None, api_key: str | None = None, protect_admin: bool = False,
              loopback_only: bool = False) -> FastAPI:
    """An app serving ``model``; the engine starts and stops with the app's lifespan.

    ``backend``: where the engine loop runs (``engine_process.ProcessBackend`` from
    ``spawn_engine``); default, a thread of this process on ``model``'s in-process engine.

    ``max_pending``: requests (choices) the server holds at once, running or queued; one
    more is answered 503 with ``Retry-After: retry_after``. A request the scheduler refuses
    (``late=reject``) is answered 429 with the same ``Retry-After``. Bodies over
    ``max_body_bytes`` (default: ``body_limit`` of the model's context) are refused with
    413 before they are buffered, bodies slower than ``body_timeout`` seconds with 408.

    ``max_choices``: prompts x ``n`` one request may ask for. ``default_max_tokens``: the
    output limit of a chat request that gives none (default, as vLLM: the rest of the
    context; completions default to OpenAI's 16 either way).

    ``api_key``: ``/v1/*`` needs ``Authorization: Bearer <key>`` (and ``/metrics``,
    ``/profile``, ``/load`` too with ``protect_admin``). ``loopback_only``: answer only
    requests whose ``Host`` is a loopback address (set when bound to one)."""
    metrics = ServerMetrics(model.name, prefix=metrics_prefix, max_model_len=model.max_model_len)
    engine = AsyncEngine(model, backend=backend, max_pending=max_pending, metrics=metrics)
    metrics.engine = engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="fairbatch", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server on the FairBatching scheduler.")
    # Starlette runs the last added middleware first: the access check, the body's size and
    # time, then a large body's value count (in a helper process), then FastAPI's parsing.
    app.add_middleware(LargeBodyCheck, max_values=max_json_values(model.max_model_len))
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or body_limit(model.max_model_len), timeout=body_timeout,
                       why="" if max_body_bytes else f" (the limit for a {model.max_model_len}-token context)")
    app.add_middleware(AccessControl, api_key=api_key, protected=protected_paths(protect_admin),
                       loopback_only=loopback_only)
    document_errors(app, per_path={"/v1/models": (401, 421), "/health": (503,), "/load": (401, 421, 503),
                                   "/profile": (401, 421, 503), "/metrics": (401, 421)})
    app.state.model = model
    app.state.engine = engine
    app.state.metrics = metrics
    add_error_handlers(app)
    add_vllm_routes(app, model, engine)     # /tokenize, /detokenize, /version, /ping
    add_info_routes(app, model, engine, metrics)   # /health, /v1/models, /load, /profile, /metrics
    serving = Serving(model, engine, metrics, retry_after, max_choices, default_max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(serving, body, raw)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(serving, body, raw)

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's format: ``APIError``, FastAPI's validation errors (400, not
    422), Starlette's HTTP errors, and anything unexpected (one request's 500)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = format_validation_errors(list(e.errors()), getattr(e, "body", None))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in a handler")
        return error_response(500, f"internal error: {type(e).__name__}")
