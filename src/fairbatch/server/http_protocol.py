"""uvicorn's h11 protocol with a deadline on request headers.

uvicorn closes a connection that stays idle *between* requests (``timeout_keep_alive``),
but not one that never finishes its first request line and headers: a client that opens a
socket and sends nothing, or a header byte now and then, holds a file descriptor forever
(300 such sockets exhausted a 256-descriptor server in the abuse run, docs/RELIABILITY.md).
Here a connection must deliver a complete request head within ``header_timeout`` seconds
of connecting, or of the first byte after the previous response; else it is closed. The
body has its own deadline (``body_limit.BodyLimit``) and the head its own size limit
(``h11_max_incomplete_event_size``, uvicorn's).

``protocol_class(header_timeout)`` is passed to uvicorn as ``http=``. It is always h11
(``httptools``, uvicorn's faster parser when installed, has the same gap; h11 is what this
project installs).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0


class _HeadDeadlineH11(H11Protocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()             # a request head has begun (or nothing yet): it must finish in time
        else:
            self._disarm()          # the head is in; the body's deadline is the app's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> type[H11Protocol]:
    """The h11 protocol class with this head deadline (seconds)."""
    if not header_timeout > 0:
        raise ValueError("the header timeout must be positive")
    return type("HeadDeadlineH11", (_HeadDeadlineH11,), {"header_timeout": float(header_timeout)})


__all__ = ["DEFAULT_HEADER_TIMEOUT", "protocol_class"]
