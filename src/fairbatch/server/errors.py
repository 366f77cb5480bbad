"""The server's errors in OpenAI's format (``fairbatch.wire.errors``): ``APIError``,
raised in a handler, and its response.

Every failure a client can cause becomes one of these with a 4xx status; the app's
handlers also turn FastAPI's validation errors (422 by default) into OpenAI's 400.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from fairbatch.wire.errors import DROPPED_REASON_HEADER, error_body

__all__ = ["DROPPED_REASON_HEADER", "LATE_REJECT_REASON", "APIError", "bad_request", "error_body", "error_response",
           "format_validation_errors"]

# Ours, in llm-d's header (``DROPPED_REASON_HEADER``): the scheduler refused the request
# (late=reject) because it could no longer meet its TTFT.
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


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _json_error(e: dict[str, Any], body: Any) -> str:
    """A readable message for a body that is not JSON: where parsing stopped, and whether
    the body simply ended there (a truncated upload)."""
    loc = e.get("loc", ())
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    why = str((e.get("ctx") or {}).get("error") or "invalid JSON")
    size = len(body) if isinstance(body, (str, bytes)) else None
    if not size:
        return "request body is empty or not valid JSON: expected a JSON object"
    where = "" if pos is None else (" " if why.endswith(" at") else " at ") + f"character {pos}"
    cut = "Unterminated" in why or (pos is not None and pos >= size - 1)
    ended = " (the body ends before the JSON does: was it cut short?)" if cut else ""
    return f"request body ({size} bytes) is not valid JSON: {why}{where}{ended}"


def format_validation_errors(errors: list[dict[str, Any]], body: Any = None) -> tuple[str, str | None]:
    """FastAPI/pydantic error list -> (one readable message, the first offending field)."""
    if errors and errors[0].get("type") == "json_invalid":
        return _json_error(errors[0], body), None
    if errors and errors[0].get("type") == "missing" and tuple(errors[0].get("loc", ())) == ("body",):
        return "request body is empty: expected a JSON object", None
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
