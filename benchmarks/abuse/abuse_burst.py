"""A burst of requests against the default queue cap (issue #14, item 5).

    python benchmarks/abuse/abuse_burst.py                      # serve's default --max-pending (from the SLO)
    python benchmarks/abuse/abuse_burst.py --max-pending 4096   # the old default
    python benchmarks/abuse/abuse_burst.py --late reject        # the scheduler refuses what cannot make its TTFT

Starts ``fairbatch serve --model tiny-llama --load-format dummy --cpu-threads 1`` (SLO
TTFT 1 s, TPOT 50 ms, ``--max-num-seqs 64``) on 127.0.0.1 and sends ``--requests``
streamed completions (a 64-token prompt, 32 output tokens) at once. Reported: statuses,
and over the accepted requests the time to first token (median, p90, max) and the share
that met the 1 s TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tiny_server import burst_client, report, tiny_server  # noqa: E402


async def one(c: httpx.AsyncClient, url: str, i: int) -> tuple[int | str, float | None]:
    t0 = time.perf_counter()
    body = {"prompt": [1 + (i + k) % 400 for k in range(64)], "max_tokens": 32, "ignore_eos": True, "stream": True}
    try:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, None
            ttft = None
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: "):
                    ttft = time.perf_counter() - t0
            return 200, ttft
    except httpx.HTTPError as e:
        return type(e).__name__, None


async def burst(url: str, n: int) -> list[tuple[int | str, float | None]]:
    async with burst_client(timeout=600) as c:
        return await asyncio.gather(*(one(c, url, i) for i in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-pending", type=int, default=None)
    ap.add_argument("--late", default=None, help="serve's --late (reject: refuse what cannot make its TTFT)")
    ap.add_argument("--port", type=int, default=8360)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    extra = ["--max-num-seqs", "64", "--ttft-slo", "1", "--tpot-slo", "0.05"]
    if args.max_pending is not None:
        extra += ["--max-pending", str(args.max_pending)]
    if args.late is not None:
        extra += ["--late", args.late]
    with tiny_server(args.port, *extra) as url:
        res = asyncio.run(burst(url, args.requests))
        ttfts = sorted(t for s, t in res if s == 200 and t is not None)
        out = {"statuses": {str(k): v for k, v in collections.Counter(s for s, _ in res).items()},
               "max_pending": args.max_pending or "default", "late": args.late or "default"}
        if ttfts:
            out.update(ttft_median_s=round(statistics.median(ttfts), 3), ttft_p90_s=round(ttfts[int(0.9 * (len(ttfts) - 1))], 3),
                       ttft_max_s=round(ttfts[-1], 3), met_1s=round(sum(t <= 1.0 for t in ttfts) / len(ttfts), 3))
        report(out, args.json)


if __name__ == "__main__":
    main()
