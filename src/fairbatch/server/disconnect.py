"""Waiting for a client to hang up, alongside the work done for it: the server aborts the
request's choices, the router stops waiting on a backend."""

from __future__ import annotations

from starlette.requests import Request


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closed the connection; the request body must have been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
