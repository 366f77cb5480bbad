"""The ways a backend fails the router: ``Retry`` (a request that did not start there and
may go to another backend), ``ClientGone``, ``PollError``, and how a transport error reads."""

from __future__ import annotations

from fastapi.responses import Response


class Retry(Exception):
    """The request did not start on this backend; try another."""

    def __init__(self, reason: str, detail: str, response: Response | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.response = response          # what to answer if no backend is left

    @property
    def refused(self) -> bool:
        """The backend refused the request (429): it could not take it in time."""
        return self.reason == "rejected"


class ClientGone(Exception):
    """The client went away while the router waited on a backend."""


class PollError(Exception):
    """A load poll got an answer the router cannot use."""


def describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
