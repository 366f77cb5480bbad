"""Large bad bodies through `fairbatch route` while small requests flow (issue #14, item 2).

    python benchmarks/abuse/abuse_router.py                                 # today's defaults
    python benchmarks/abuse/abuse_router.py --max-body-bytes 67108864       # serve's and route's old 64 MiB limit

Two `fairbatch serve` replicas (tiny-llama, dummy weights, one CPU thread each) behind
`fairbatch route` on 127.0.0.1. ``--small`` small completions (8 tokens) are sent at once
while an abuser process sends ``--bad`` bodies of 60 MB of token ids (a prompt far over any
context: the right answer is 400). Reported: the small requests' statuses, the bad bodies'
statuses and times, and how often the router marked a backend unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing as mp
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from fairbatch.bench.prometheus_text import samples

sys.path.insert(0, str(Path(__file__).parent))
from tiny_server import burst_client, local_url, report, running, tiny_serve_cmd, wait_healthy  # noqa: E402

BAD = b'{"prompt": [' + b"12345," * 10_000_000 + b'1]}'


def abuser(url: str, n: int, out: "mp.Queue", go: "mp.Event") -> None:
    go.wait()
    res = []
    with httpx.Client(timeout=600) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                status: int | str = c.post(url + "/v1/completions", content=BAD,
                                           headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            res.append({"status": status, "seconds": round(time.perf_counter() - t0, 2)})
    out.put(res)


async def small_requests(url: str, n: int, started: "mp.Event") -> collections.Counter:
    async with burst_client(timeout=600) as c:
        async def one(i: int) -> int | str:
            try:
                r = await c.post(url + "/v1/completions", json={"prompt": [1 + i % 90, 2, 3], "max_tokens": 8,
                                                                "ignore_eos": True})
                return r.status_code
            except httpx.HTTPError as e:
                return type(e).__name__

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        started.set()
        return collections.Counter(await asyncio.gather(*tasks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-body-bytes", type=int, default=None)
    ap.add_argument("--small", type=int, default=293)
    ap.add_argument("--bad", type=int, default=3)
    ap.add_argument("--port", type=int, default=8330)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    limit = ["--max-body-bytes", str(args.max_body_bytes)] if args.max_body_bytes else []
    serve = ["--max-model-len", "2048", "--ttft-slo", "30", "--tpot-slo", "5", "--max-pending", "1024", *limit]
    ports = [args.port + 1 + i for i in range(2)]
    urls = [local_url(p) for p in ports]
    url = local_url(args.port)
    with ExitStack() as servers:
        replicas = [servers.enter_context(running(tiny_serve_cmd(port, *serve))) for port in ports]
        for u, proc in zip(urls, replicas):          # the replicas start side by side
            wait_healthy(u, proc, tries=900)
        servers.enter_context(running(["route", "--backend", urls[0], "--backend", urls[1], "--port", str(args.port),
                                       "--log-level", "warning", *limit], url, tries=900))
        ctx = mp.get_context("spawn")
        q, go = ctx.Queue(), ctx.Event()
        p = ctx.Process(target=abuser, args=(url, args.bad, q, go))
        p.start()
        small = asyncio.run(small_requests(url, args.small, go))
        bad = q.get()
        p.join()
        metrics = httpx.get(url + "/metrics", timeout=30).text
        marked = sum(s.value for s in samples(metrics) if s.name == "fairbatch_router:backend_marked_unhealthy_total")
        report({"small_statuses": {str(k): v for k, v in small.items()}, "bad_bodies": bad,
                "backends_marked_unhealthy": marked, "max_body_bytes": args.max_body_bytes or "default"}, args.json)


if __name__ == "__main__":
    main()
