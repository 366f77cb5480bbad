"""``/openapi.json`` that says what the server answers.

FastAPI documents a 422 for every body it validates; this server (as OpenAI's and vLLM's)
answers 400 for a bad body, in OpenAI's error shape. ``document_errors(app, ...)`` rewrites
the generated schema once: 422 becomes 400, and the other errors a client can get are
listed with the same ``ErrorResponse`` schema (so schema-driven clients and fuzzers check
answers against the truth).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "code": {"type": "integer"}}}},
}
DESCRIPTIONS = {
    400: "Bad request: the body is not valid JSON, breaks the schema, or does not fit the model",
    401: "A valid API key is needed (Authorization: Bearer KEY)",
    404: "Unknown model or path",
    405: "Method not allowed on this path",
    408: "The request body did not arrive in time",
    413: "The request body is larger than the limit (sized from the model's context)",
    421: "Unexpected Host header (a loopback-bound server answers only requests addressed to it)",
    429: "Refused: the request could not meet its time-to-first-token SLO (late=reject); Retry-After",
    500: "The engine failed the request",
    503: "At capacity, or no engine / backend available; Retry-After",
}
BODY_ERRORS = (400, 401, 404, 405, 408, 413, 421, 429, 500, 503)
OTHER_ERRORS = (401, 405, 421, 503)


def document_errors(app: FastAPI, *, body_errors: Sequence[int] = BODY_ERRORS,
                    other_errors: Sequence[int] = OTHER_ERRORS,
                    per_path: Mapping[str, Sequence[int]] | None = None,
                    streaming: Sequence[str] = ("/v1/completions", "/v1/chat/completions"),
                    plain_text: Sequence[str] = ("/metrics",)) -> None:
    """Replace ``app.openapi`` with a generator whose operations list these errors:
    ``body_errors`` on operations with a request body, ``other_errors`` elsewhere,
    ``per_path[path]`` where given. A 200 of a ``streaming`` path may also be an SSE stream
    (``stream: true``); one of a ``plain_text`` path is text (Prometheus)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorResponse"] = ERROR_SCHEMA
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                codes = (per_path or {}).get(path) or (body_errors if "requestBody" in op else other_errors)
                for code in codes:
                    responses.setdefault(str(code), {"description": DESCRIPTIONS.get(code, "Error"), "content": ref})
                ok = responses.get("200")
                if ok is not None and path in streaming:
                    ok.setdefault("content", {})["text/event-stream"] = {}   # SSE: events of the JSON above
                if ok is not None and path in plain_text:
                    ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi   # type: ignore[method-assign]


__all__ = ["document_errors"]
