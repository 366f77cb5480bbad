"""The router's FastAPI app: ``build_router_app(backends, router)``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fairbatch.cluster.router.config import RouterConfig
from fairbatch.cluster.router.failures import describe
from fairbatch.cluster.router.forward import backend_headers, forward
from fairbatch.cluster.router.metrics import CONTENT_TYPE
from fairbatch.cluster.router.state import RouterState
from fairbatch.routing import Router, make_router
from fairbatch.server.access import AccessControl, protected_paths
from fairbatch.server.body_limit import BodyLimit
from fairbatch.server.body_precheck import LargeBodyCheck, max_json_values
from fairbatch.server.errors import error_response
from fairbatch.server.openapi import document_errors

_ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


def build_router_app(backends: Sequence[str], router: str | Router = "admission", *,
                     config: RouterConfig | None = None,
                     backend_meta: Sequence[Mapping[str, Any]] | None = None) -> FastAPI:
    """The router app over ``backends`` (base URLs). ``router``: a policy spec
    (``NAME[:KEY=VALUE,...]``, see ``routing.make_router``) or a Router."""
    r = make_router(router) if isinstance(router, str) else router
    state = RouterState(backends, r, config or RouterConfig(), backend_meta)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        await state.poller.wait_first_polls()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="fairbatch router", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible router over fairbatch (or any OpenAI-compatible) servers.")
    app.state.router = state
    cfg = state.config
    app.add_middleware(LargeBodyCheck, max_values=max_json_values(1 << 17))   # the router parses bodies too
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout=cfg.body_timeout)
    app.add_middleware(AccessControl, api_key=cfg.api_key, protected=protected_paths(cfg.protect_admin),
                       loopback_only=cfg.loopback_only)
    document_errors(app, per_path={"/health": (503,), "/v1/models": (401, 421, 503)})

    @app.get("/health")
    async def health() -> Response:
        n = sum(b.healthy for b in state.backends)
        if n == 0:
            down = "; ".join(f"{b.url}: {b.error}" for b in state.backends)
            return error_response(503, "no healthy backend: " + down)
        return JSONResponse({"status": "ok", "healthy_backends": n, "backends": len(state.backends)})

    @app.get("/backends")
    async def backends_info() -> JSONResponse:
        now = time.time()
        return JSONResponse({"router": state.router.name, "count_sent": state.router.count_sent,
                             "backends": [b.info(now, cfg.show_backend_details) for b in state.backends]})

    @app.get("/load")
    async def load() -> JSONResponse:
        return JSONResponse(state.aggregate_load())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        assert state.client is not None
        errors = []
        auth = {k: v for k, v in backend_headers(state.config, request).items() if k.lower() == "authorization"}
        for b in state.backends:
            if not b.healthy:
                continue
            try:
                r = await state.client.get(b.url + "/v1/models", timeout=state.config.poll_timeout * 5, headers=auth)
            except httpx.HTTPError as e:
                errors.append(f"{b.url}: {describe(e)}")
                continue
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        return error_response(503, "no healthy backend" + (": " + "; ".join(errors) if errors else ""),
                              headers={"Retry-After": "1"})

    async def route(request: Request) -> Response:
        return await forward(state, request)

    for path in _ROUTED_PATHS:
        app.add_api_route(path, route, methods=["POST"], include_in_schema=True)
    return app
