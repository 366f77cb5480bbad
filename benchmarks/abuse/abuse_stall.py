"""Another client's longest inter-token gap while abusive bodies arrive (issue #14, item 1).

    python benchmarks/abuse/abuse_stall.py                                 # serve's defaults
    python benchmarks/abuse/abuse_stall.py --max-body-bytes 67108864       # the old 64 MiB limit

Starts ``fairbatch serve --model tiny-llama --load-format dummy --cpu-threads 1`` (engine
in its own process, as deployed) on 127.0.0.1. A victim client streams a long completion
and records when each token event arrives; first alone ("quiet"), then while an abuser
sends, one after another, the bodies below ("abuse": from a little before the first body to
a little after the last; "while_bodies_arrive": from the first body's send to the last
one's answer). Reported: the victim's median, p99 and longest gap between events in each,
each gap over 30 ms with the body in flight then, and each abusive body's status and time.

Bodies: the largest list of token ids under the body limit; the same as text; a 60 MB
list of token ids (the issue's: parsed and validated before the old limit refused it);
100,000 nested brackets; 10 x 2 MB of text prompts in one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tiny_server import report, tiny_server  # noqa: E402


def bodies(limit: int) -> list[tuple[str, bytes]]:
    under = (limit - 64) // 2                    # "1," per id
    return [
        (f"ids filling the limit ({limit / 2**20:.1f} MiB)", b'{"prompt": [' + b"1," * (under - 1) + b'1]}'),
        (f"text filling the limit ({limit / 2**20:.1f} MiB)", b'{"prompt": "' + b"a " * ((limit - 64) // 2) + b'"}'),
        ("60 MB of token ids", b'{"prompt": [' + b"12345," * 10_000_000 + b'1]}'),
        ("100,000 nested brackets", b'{"prompt": ' + b"[" * 100_000 + b"}"),
        ("10 x 2 MB text prompts", json.dumps({"prompt": ["b " * 1_000_000] * 10}).encode()),
    ]


async def victim(url: str, max_tokens: int, stop: asyncio.Event | None = None,
                 started: asyncio.Event | None = None) -> list[list[float]]:
    """Arrival times of the events of long streams, one list per stream: one stream, or
    (with ``stop``) one after another until ``stop`` is set. ``started`` is set once the
    first stream has produced a few events."""
    streams: list[list[float]] = []
    body = {"prompt": "The victim's stream", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=300) as c:
        while True:
            times: list[float] = []
            streams.append(times)
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        times.append(time.perf_counter())
                        if started is not None and len(times) == 5:
                            started.set()
                        if stop is not None and stop.is_set():
                            break
            if stop is None or stop.is_set():
                return streams


def gaps_ms(streams: list[list[float]]) -> dict[str, float]:
    g = sorted((b - a) * 1e3 for times in streams for a, b in zip(times, times[1:]))
    if not g:
        return {}
    return {"events": sum(len(t) for t in streams), "median_ms": round(statistics.median(g), 2),
            "p99_ms": round(g[int(0.99 * (len(g) - 1))], 2), "max_ms": round(g[-1], 2)}


def abuse(url: str, limit: int, out: "mp.Queue", go: "mp.Event", only: list[int] | None = None,
          repeat: int = 1) -> None:
    """The abuser, in its own process: building and sending 60 MB must not stall the
    victim's client (it would, on one event loop), only, if at all, the server. It builds
    its bodies first (CPU the 2-core machine's other processes would miss), says so, and
    sends them when told."""
    cases = [c for i, c in enumerate(bodies(limit)) if only is None or i in only] * repeat
    out.put("ready")
    go.wait()
    results = []
    with httpx.Client(timeout=300) as c:
        for k, (name, raw) in enumerate(cases):
            name = f"{name} #{k + 1}" if repeat > 1 else name
            t0 = time.perf_counter()
            try:
                r = c.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
                status: int | str = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            t1 = time.perf_counter()
            results.append({"body": name, "bytes": len(raw), "status": status, "seconds": round(t1 - t0, 3),
                            "window": (t0, t1)})
    out.put(results)


async def main_async(url: str, limit: int, max_tokens: int, only: list[int] | None, repeat: int) -> dict:
    quiet = await victim(url, max_tokens)
    loop = asyncio.get_running_loop()
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=abuse, args=(url, limit, q, go, only, repeat))
    p.start()
    assert await loop.run_in_executor(None, q.get) == "ready"
    stop, started = asyncio.Event(), asyncio.Event()
    stream = asyncio.ensure_future(victim(url, 1500, stop, started))
    await started.wait()                              # the victim streams before the abuse starts
    go.set()
    results = await loop.run_in_executor(None, q.get)
    stop.set()
    loud = await stream
    p.join()                                          # after the victim: joining blocks this loop
    t0, t1 = results[0]["window"][0], results[-1]["window"][1]
    during = [[t for t in times if t0 <= t <= t1] for times in loud]
    return {"quiet": gaps_ms(quiet), "abuse": gaps_ms(loud), "while_bodies_arrive": gaps_ms(during),
            "long_gaps": long_gaps(loud, results),
            "bodies": [{k: v for k, v in r.items() if k != "window"} for r in results]}


def long_gaps(streams: list[list[float]], results: list[dict], over_ms: float = 30.0) -> list[dict]:
    """Each gap over ``over_ms``, and the abusive body being sent when it ended (if any)."""
    out = []
    for times in streams:
        for a, b in zip(times, times[1:]):
            if (b - a) * 1e3 > over_ms:
                during = [r["body"] for r in results if r["window"][0] <= b and a <= r["window"][1]]
                out.append({"ms": round((b - a) * 1e3, 1), "during": during or ["no abusive body in flight"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-body-bytes", type=int, default=None, help="serve's --max-body-bytes (default: its own)")
    ap.add_argument("--max-tokens", type=int, default=400, help="the victim's tokens in the quiet phase")
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--only", type=int, action="append", help="send only these bodies (0-based; repeatable)")
    ap.add_argument("--repeat", type=int, default=1, help="send the bodies this many times")
    args = ap.parse_args()
    extra = ["--max-model-len", "2048", "--ttft-slo", "5", "--tpot-slo", "1"]
    if args.max_body_bytes is not None:
        extra += ["--max-body-bytes", str(args.max_body_bytes)]
    with tiny_server(args.port, *extra) as url:
        try:
            from fairbatch.server.body_limit import body_limit

            limit = args.max_body_bytes or body_limit(2048)
        except ImportError:                           # a server from before the limit followed the context
            limit = args.max_body_bytes or 64 << 20
        out = asyncio.run(main_async(url, limit, args.max_tokens, args.only, args.repeat))
        out["max_body_bytes"] = limit
        report(out, args.json)


if __name__ == "__main__":
    main()
