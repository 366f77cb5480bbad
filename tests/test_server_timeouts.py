"""Connections that take too long or come too many (issue #14, item 4), on a small app
with the server's and router's middleware and uvicorn settings (no model): a request head
that never completes is closed, a body that never completes gets 408, connections past
the cap get 503, and ordinary requests go on being served. Raw sockets on 127.0.0.1; the
socket timeouts only turn a hang into a failure."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402

from fairbatch.server.body_limit import BodyLimit  # noqa: E402
from fairbatch.server.runner import ConnectionLimits, ServerThread, default_max_connections  # noqa: E402
from support import wait_for  # noqa: E402

HANG_GUARD = 30.0


def small_app(body_timeout: float = 0.3) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=1 << 20, timeout=body_timeout)

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    return app


def connect(url_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", url_port), timeout=HANG_GUARD)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_an_unfinished_request_head_is_closed():
    with ServerThread(small_app(), limits=ConnectionLimits(header_timeout=0.2)) as srv:
        idle = connect(srv.port)                          # sends nothing at all
        partial = connect(srv.port)
        partial.sendall(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")   # never ends its headers
        assert read_all(idle) == b""                      # closed by the server
        assert read_all(partial) == b""
        assert httpx.get(srv.url + "/ok").status_code == 200


def test_a_slow_body_gets_408_and_a_whole_one_is_served():
    with ServerThread(small_app(body_timeout=0.2)) as srv:
        s = connect(srv.port)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n0123456789")          # 10 of 100 bytes, then silence
        answer = read_all(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"RequestTimeoutError" in answer
        r = httpx.post(srv.url + "/echo", content=b"x" * 5000)
        assert r.status_code == 200 and r.json() == {"bytes": 5000}


def test_connections_past_the_cap_get_503():
    limits = ConnectionLimits(header_timeout=HANG_GUARD, max_connections=4)
    with ServerThread(small_app(), limits=limits) as srv:
        held = [connect(srv.port) for _ in range(3)]
        state = srv.server.server_state
        wait_for(lambda: len(state.connections) >= 3, "the server to accept the idle connections")
        r = httpx.get(srv.url + "/ok")
        assert r.status_code == 503
        for s in held:
            s.close()
        wait_for(lambda: len(state.connections) == 0, "the idle connections to close")
        assert httpx.get(srv.url + "/ok").status_code == 200


def test_limits_are_checked_and_the_default_cap_fits_the_descriptors():
    import resource

    with pytest.raises(ValueError, match="--header-timeout"):
        ConnectionLimits(header_timeout=0)
    with pytest.raises(ValueError, match="--max-connections"):
        ConnectionLimits(max_connections=0)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = default_max_connections()
    assert 16 <= cap <= 4096 and (soft == resource.RLIM_INFINITY or cap <= max(16, soft - 128))
