"""The bench's lean streaming client against a raw socket server that answers with
hand-written HTTP: chunk framing split anywhere, trailers, Content-Length and close-framed
bodies, keep-alive reuse, and httpx's exception types for every failure."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")

from fairbatch.bench.stream_client import StreamingClient  # noqa: E402

EVENTS = b'data: {"choices":[{"text":"a"}]}\n\ndata: [DONE]\n\n'


def chunked(body: bytes, sizes: list[int], trailer: bytes = b"") -> bytes:
    out, pos = b"", 0
    for n in sizes:
        out += f"{n:x}\r\n".encode() + body[pos:pos + n] + b"\r\n"
        pos += n
    assert pos == len(body)
    return out + b"0\r\n" + trailer + b"\r\n"


async def serve(answers: list[bytes], *, pieces: int = 1, connections: list | None = None):
    """A server that reads one request head (+ its body) per answer and writes the answer
    in ``pieces`` separate writes; returns (server, url)."""
    queue = list(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connections is not None:
            connections.append(writer)
        while queue:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            answer = queue.pop(0)
            if answer == b"hang":
                await asyncio.sleep(3600)
            step = max(1, len(answer) // pieces)
            for i in range(0, len(answer), step):
                writer.write(answer[i:i + step])
                await writer.drain()
            if b"Connection: close" in answer:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/completions"


async def read_all(client: StreamingClient, url: str) -> tuple[int, bytes]:
    async with client.stream("POST", url, json={"prompt": [1, 2], "stream": True}) as r:
        return r.status_code, b"".join([p async for p in r.aiter_bytes()])


def run(coro):
    return asyncio.run(coro)


def test_chunked_bodies_split_anywhere_with_trailers_and_keep_alive_reuse():
    async def main():
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        answers = [head + chunked(EVENTS, [10, len(EVENTS) - 10]),
                   head + chunked(EVENTS, [len(EVENTS)], trailer=b"X-Trailer: 1\r\n")]
        conns: list = []
        server, url = await serve(answers, pieces=7, connections=conns)
        async with server, StreamingClient(timeout=10) as client:
            assert await read_all(client, url) == (200, EVENTS)
            assert await read_all(client, url) == (200, EVENTS)
        assert len(conns) == 1            # the second request went over the first connection
    run(main())


def test_content_length_and_close_framed_bodies():
    async def main():
        sized = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom"
        closed = b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n" + EVENTS
        server, url = await serve([sized, closed])
        async with server, StreamingClient(timeout=10) as client:
            async with client.stream("POST", url, json={}) as r:
                assert r.status_code == 500 and await r.aread() == b"boom"
            assert await read_all(client, url) == (200, EVENTS)
    run(main())


def test_a_reader_that_stops_at_done_still_returns_a_whole_response_to_the_pool():
    async def main():
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        conns: list = []
        server, url = await serve([head + chunked(EVENTS, [len(EVENTS)])] * 2, connections=conns)
        async with server, StreamingClient(timeout=10) as client:
            for _ in range(2):
                async with client.stream("POST", url, json={}) as r:
                    async for piece in r.aiter_bytes():
                        if b"[DONE]" in piece:
                            break
                    while not r._conn.buf.endswith(b"0\r\n\r\n"):      # the last chunk has arrived
                        await r._conn.more(10)
        assert len(conns) == 1
    run(main())


def test_failures_raise_httpx_exceptions():
    async def main():
        cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n5\r\nab"
        server, url = await serve([cut, b"hang"])
        async with server:
            async with StreamingClient(timeout=10) as client:
                with pytest.raises(httpx.RemoteProtocolError):
                    await read_all(client, url)
            async with StreamingClient(timeout=0.05) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await read_all(client, url)
        async with StreamingClient(timeout=10) as client:
            with pytest.raises(httpx.ConnectError):
                await read_all(client, url)             # the server is gone
            with pytest.raises(httpx.UnsupportedProtocol):
                await read_all(client, "https://127.0.0.1/")
    run(main())


def test_the_lean_client_only_for_direct_http(monkeypatch):
    from fairbatch.bench.stream_client import client_for

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(client_for("http://127.0.0.1:8000/v1/completions", 10), StreamingClient)
    assert isinstance(client_for("https://example.com/v1/completions", 10), httpx.AsyncClient)
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    assert isinstance(client_for("http://example.com/v1/completions", 10), httpx.AsyncClient)
