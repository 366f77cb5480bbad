"""OpenAI-compatible HTTP server on the engine: FastAPI app, the engine loop in its own
process (or on a thread), Prometheus metrics. ``fairbatch serve`` runs it; ``build_app`` / ``ServerThread`` embed it."""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncEngine", "ServedModel", "ServerThread", "build_app", "load_served_model"]


def __getattr__(name: str) -> Any:
    # Lazy: `fairbatch --help` must not import fastapi, uvicorn or torch.
    if name == "build_app":
        from fairbatch.server.app import build_app

        return build_app
    if name == "AsyncEngine":
        from fairbatch.server.async_engine import AsyncEngine

        return AsyncEngine
    if name == "ServedModel":
        from fairbatch.server.model import ServedModel

        return ServedModel
    if name == "ServerThread":
        from fairbatch.server.runner import ServerThread

        return ServerThread
    if name == "load_served_model":
        from fairbatch.server.commands import load_served_model

        return load_served_model
    raise AttributeError(f"module 'fairbatch.server' has no attribute {name!r}")
