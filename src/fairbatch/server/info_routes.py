"""The server's endpoints about itself: ``GET /health``, ``/v1/models``, ``/load`` (the
scheduler's load estimate, for routers), ``/profile`` (the scheduler's current step-time
model, loadable by the simulator) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from fairbatch.server.async_engine import AsyncEngine, EngineDead
from fairbatch.server.errors import APIError, error_response
from fairbatch.server.metrics import CONTENT_TYPE, ServerMetrics
from fairbatch.server.model import ServedModel


def add_info_routes(app: FastAPI, model: ServedModel, engine: AsyncEngine, metrics: ServerMetrics) -> None:
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, engine.error or "engine not running")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": model.name, "object": "model", "created": created, "owned_by": "fairbatch",
            "root": model.name, "parent": None, "max_model_len": model.max_model_len,
            "fairbatch": {"policy": model.policy, "vocab_size": model.vocab_size, "device": model.device,
                          "default_slo": {"ttft_ms": model.default_slo.ttft * 1e3,
                                          "tpot_ms": model.default_slo.tpot * 1e3},
                          "prefix_caching": model.prefix_caching, "block_size": model.info.block_size},
        }]})

    @app.get("/load")
    async def load() -> JSONResponse:
        try:
            ld = await engine.load()
        except EngineDead as e:
            raise APIError(503, f"engine unavailable: {e}") from None
        except asyncio.TimeoutError:
            raise APIError(503, "the engine did not answer in time") from None
        out = asdict(ld)
        out["num_requests"] = ld.num_requests
        out["policy"] = model.policy
        out["model"] = model.name
        out["max_pending"] = engine.max_pending
        out["num_requests_in_server"] = engine.num_active
        return JSONResponse(out)

    @app.get("/profile")
    async def profile() -> JSONResponse:
        """The step-time model the scheduler uses now (refitted online when enabled), in
        `fairbatch profile`'s format: `fairbatch simulate --profile` replays this host."""
        if engine.latency_profile is None:
            raise APIError(503, "the engine has not reported its step-time model yet")
        return JSONResponse(engine.latency_profile)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)
