"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``, written
by the server and the router, read back by the router and the benchmark client."""

from __future__ import annotations

import json
from typing import Any

# The ``type`` OpenAI's clients expect for each status; anything else is an "APIError".
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    421: "MisdirectedRequestError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
}

# Why a request was refused, in a response header: the one llm-d's inference gateway (its
# endpoint picker, llm-d-router) sets on the 429 / 503 of a request it dropped, with values
# of the form "rejected-<why>".
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_message(obj: Any) -> str | None:
    """The message of a parsed error body or stream event; None when it carries no error.
    Older vLLM servers put the error's fields at the top level (``{"object": "error",
    "message": ...}``): read those too."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if err is None:
        if obj.get("object") != "error":
            return None
        err = obj
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def describe_error(content: bytes, limit: int = 200) -> str:
    """What an error answer says, for a log line or a failure reason: the message of its
    body (or of its one SSE event), else its text; at most ``limit`` characters."""
    payload = content.split(b"data:", 1)[-1] if content.startswith(b"data:") else content
    try:
        message = error_message(json.loads(payload))
    except (ValueError, UnicodeDecodeError):
        message = None
    if message is None:
        message = content.decode("utf-8", "replace").strip() or "(empty body)"
    return message[:limit]
