"""A lean HTTP/1.1 client for the benchmark's streamed POSTs to an ``http://`` server.

One bench process reads every token event of every stream, and with httpx each event costs
about 100 us of its CPU (httpcore's per-read timeout scope, anyio's pause/resume of the
socket, h11's event objects): at a few thousand tokens/s the client's own loop then holds
first tokens back for milliseconds, and that delay lands in the TTFT it reports. Here a
connection is an ``asyncio.Protocol`` that appends what arrives to a buffer, and the body
is cut into chunks (chunked transfer coding, a Content-Length, or up to the close) straight
from it.

It offers the part of ``httpx.AsyncClient`` that ``client.send_request`` uses: ``stream(
"POST", url, json=...)`` as an async context manager whose response has ``status_code``,
``aread()`` and ``aiter_bytes()``; failures raise httpx's exceptions (``ConnectError``,
``ReadTimeout``, ``RemoteProtocolError``, ...), so records carry the same error text.
``timeout`` bounds each wait for the server (connect: at most 60 s), as httpx's does.
Connections whose response was read to its end are kept for the next request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx

CONNECT_TIMEOUT = 60.0
MAX_IDLE = 512                  # kept-alive connections per client, as the httpx client's pool
_CRLF = b"\r\n"


class _Connection(asyncio.Protocol):
    """A socket's bytes as they come, and a way to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport        # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def more(self, timeout: float) -> None:
        """Wait until more bytes arrived (or the server closed); ReadTimeout after ``timeout``."""
        if self.closed:
            raise httpx.RemoteProtocolError("the server closed the connection mid-response")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("no data from the server within the timeout"))


class StreamResponse:
    """The status, headers and body of one response, read from ``conn`` as it comes."""

    def __init__(self, conn: _Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.complete = False             # the whole body was read
        self.keep_alive = True
        self.chunked = False

    async def read_head(self) -> None:
        conn = self._conn
        while (end := conn.buf.find(b"\r\n\r\n")) < 0:
            await conn.more(self._timeout)
        head = bytes(conn.buf[:end]).decode("latin-1").split("\r\n")
        del conn.buf[:end + 4]
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"bad status line {head[0][:80]!r}")
        self.status_code = int(parts[1])
        for line in head[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.keep_alive = parts[0] != "HTTP/1.0" and self.headers.get("connection", "").lower() != "close"
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()

    def finish_if_read(self) -> None:
        """A reader that stopped at the stream's last event ([DONE]) leaves the last chunk
        unread; if it has arrived, the connection can still carry another request."""
        buf = self._conn.buf
        if self.chunked and not self.complete and buf.startswith(b"0\r\n"):
            end = _last_chunk_end(buf, 1)
            if end >= 0:
                del buf[:end]
                self.complete = True

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self.chunked:
            body = self._chunked()
        elif "content-length" in self.headers:
            body = self._sized(int(self.headers["content-length"]))
        else:
            body = self._until_close()
        async for piece in body:
            yield piece

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_bytes()])

    async def _chunked(self) -> AsyncIterator[bytes]:
        conn, buf = self._conn, self._conn.buf
        while True:
            while (eol := buf.find(_CRLF)) < 0:
                await conn.more(self._timeout)
            try:
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {bytes(buf[:eol])[:40]!r}") from None
            if size == 0:
                while (end := _last_chunk_end(buf, eol)) < 0:
                    await conn.more(self._timeout)
                del buf[:end]
                self.complete = True
                return
            start = eol + 2
            while len(buf) < start + size + 2:
                await conn.more(self._timeout)
            piece = bytes(buf[start:start + size])
            del buf[:start + size + 2]
            yield piece

    async def _sized(self, n: int) -> AsyncIterator[bytes]:
        conn = self._conn
        while n > 0:
            if not conn.buf:
                await conn.more(self._timeout)
            piece = bytes(conn.buf[:n])
            del conn.buf[:len(piece)]
            n -= len(piece)
            yield piece
        self.complete = True

    async def _until_close(self) -> AsyncIterator[bytes]:
        conn = self._conn
        self.keep_alive = False
        while True:
            if conn.buf:
                piece = bytes(conn.buf)
                conn.buf.clear()
                yield piece
            elif conn.closed:
                self.complete = True
                return
            else:
                await conn.more(self._timeout)


def _last_chunk_end(buf: bytearray, eol: int) -> int:
    """Where the last chunk (size 0, its line ending at ``eol``) and its optional trailer
    lines end, or -1 while that has not all arrived."""
    if buf[eol + 2:eol + 4] == _CRLF:
        return eol + 4
    end = buf.find(b"\r\n\r\n", eol)
    return end + 4 if end >= 0 else -1


class StreamingClient:
    """``async with StreamingClient(timeout) as c: async with c.stream("POST", url, json=body) as r: ...``"""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    @asynccontextmanager
    async def stream(self, method: str, url: str, *, json: Any = None) -> AsyncIterator[StreamResponse]:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"StreamingClient speaks http:// only, not {url!r}")
        host, port = parts.hostname, parts.port or 80
        body = _json_bytes(json)
        host_header = f"[{host}]" if ":" in host else host
        if parts.port:
            host_header += f":{port}"
        head = (f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
                f"Host: {host_header}\r\nAccept: */*\r\nUser-Agent: fairbatch-bench\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
        conn = await self._connection(host, port)
        resp = StreamResponse(conn, self.timeout)
        try:
            assert conn.transport is not None
            conn.transport.write(head + body)
            await resp.read_head()
            yield resp
        except BaseException:
            conn.close()
            raise
        resp.finish_if_read()
        if resp.complete and resp.keep_alive and not conn.closed and not conn.buf:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        conn.close()      # the body was not read to its end: the connection cannot carry another

    async def _connection(self, host: str, port: int) -> _Connection:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, host, port),
                                             min(CONNECT_TIMEOUT, self.timeout))
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within the timeout") from None
        except OSError as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e}") from None
        return conn


def _json_bytes(obj: Any) -> bytes:
    # as httpx encodes json= bodies
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def client_for(url: str, timeout: float, **httpx_kwargs: Any) -> "StreamingClient | httpx.AsyncClient":
    """The lean client for an ``http://`` URL reached directly; httpx for anything else
    (https, or a proxy the environment names for this host, which httpx honours)."""
    parts = urlsplit(url)
    proxied = "http" in getproxies() and not proxy_bypass(parts.hostname or "")
    if parts.scheme == "http" and not proxied:
        return StreamingClient(timeout)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)), **httpx_kwargs)


__all__ = ["StreamingClient", "StreamResponse", "client_for"]
