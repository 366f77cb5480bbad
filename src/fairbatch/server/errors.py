"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes one of these with a 4xx status; the app's
handlers also turn FastAPI's validation errors (422 by default) into OpenAI's 400.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


# Why a request was refused, in a response header: the one llm-d's inference gateway (its
# endpoint picker, llm-d-router) sets on the 429 / 503 of a request it dropped, with values
# of the form "rejected-<why>". Ours: the scheduler refused the request (late=reject)
# because it could no longer meet its TTFT.
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
LATE_REJECT_REASON = "rejected-ttft-unattainable"


class APIError(Exception):
    """Raised anywhere in a handler; the app turns it into an OpenAI error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def format_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI/pydantic error list -> (one readable message, the first offending field)."""
    parts = []
    param = None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        msg = str(e.get("msg", "invalid value"))
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, param
