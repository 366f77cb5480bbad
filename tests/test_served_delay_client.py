"""The bench's streaming client (aiohttp, ``bench/client.py``) against a raw socket server
that answers with hand-written HTTP: a stream split anywhere is timed per event and its
usage read, the connection is kept for the next request, every failure becomes a record
with its reason, and a proxy the environment names is used."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("aiohttp")

from fairbatch.bench.client import BenchRequest, make_payload, open_session, send_request  # noqa: E402
from fairbatch.metrics.records import REJECTED  # noqa: E402
from fairbatch.request import SLO  # noqa: E402

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
USAGE = {"prompt_tokens": 2, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 16}}


def events(n_tokens: int, usage: dict | None = None) -> bytes:
    out = b"".join(b'data: {"choices":[{"index":0,"text":"a"}]}\n\n' for _ in range(n_tokens))
    if usage is not None:
        out += b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


async def serve(answers: list[bytes], *, pieces: int = 1, seen: list | None = None):
    """A server that reads one request (head + body) per answer and writes the answer in
    ``pieces`` writes; ``seen`` gets each request's first line, and one None per
    connection. Returns (server, base URL)."""
    queue = list(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen is not None:
            seen.append(None)
        while queue:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if seen is not None:
                seen.append(head.split(b"\r\n")[0].decode())
            answer = queue.pop(0)
            if answer == b"hang":
                await asyncio.Event().wait()
            step = max(1, len(answer) // pieces)
            for i in range(0, len(answer), step):
                writer.write(answer[i:i + step])
                await writer.drain()
            if b"Connection: close" in answer:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def request(n: int = 3) -> BenchRequest:
    return BenchRequest("r", 0.0, [1, 2], n, SLO(1.0, 0.05))


async def send(session, url: str, req: BenchRequest, cached: dict | None = None):
    return await send_request(session, url + "/v1/completions", req, make_payload(req, "m"), cached=cached)


def test_a_stream_split_anywhere_is_timed_and_its_connection_kept():
    async def main():
        answer = HEAD + chunked(events(3, USAGE), 10)
        seen: list = []
        server, url = await serve([answer, answer], pieces=9, seen=seen)
        cached: dict[str, int] = {}
        async with server, open_session(10) as session:
            recs = [await send(session, url, request(), cached) for _ in range(2)]
        for rec in recs:
            assert rec.success and rec.output_len == 3 and len(rec.token_times) == 3, rec.error
            assert rec.first_token_time == rec.token_times[0] >= rec.arrival
        assert cached == {"r": 16}
        assert seen == [None, "POST /v1/completions HTTP/1.1", "POST /v1/completions HTTP/1.1"]   # one connection
    asyncio.run(main())


def test_failures_become_records_with_their_reasons():
    async def main():
        cut = HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + b"40\r\ndata: {\"choices\""
        refused = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"
        failed = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom"
        short = HEAD + chunked(events(2), 7)
        server, url = await serve([refused, failed, short, cut, b"hang"])
        async with server:
            async with open_session(10) as session:
                assert (await send(session, url, request())).error == REJECTED
                assert (await send(session, url, request())).error == "HTTP 500: boom"
                assert (await send(session, url, request())).error == "short output: 2 of 3 tokens"
                assert (await send(session, url, request())).error.startswith("ClientPayloadError")
            async with open_session(0.05) as session:
                assert (await send(session, url, request())).error.startswith("timeout: ")
        async with open_session(10) as session:
            gone = await send(session, url, request())                  # the server is gone
        assert not gone.success and gone.error.startswith("ClientConnectorError")
    asyncio.run(main())


def test_a_proxy_named_in_the_environment_is_used(monkeypatch):
    async def main():
        seen: list = []
        server, proxy = await serve([HEAD + chunked(events(3, USAGE), 64)], seen=seen)
        monkeypatch.setenv("http_proxy", proxy)
        async with server, open_session(10) as session:
            rec = await send(session, "http://bench.invalid:8000", request())
        assert rec.success, rec.error
        assert seen == [None, "POST http://bench.invalid:8000/v1/completions HTTP/1.1"]

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    asyncio.run(main())
