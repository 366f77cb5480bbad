"""Disconnect storms and engine kills against `fairbatch serve` (issue #14's abuse run).

    python benchmarks/abuse/abuse_storms.py --storms 10 --clients 200 --kills 2

Starts ``fairbatch serve --model tiny-llama --load-format dummy --cpu-threads 1`` on
127.0.0.1 (its default ``--engine-restarts 3``). Each storm: ``--clients`` concurrent
streams of 24 tokens, every third client hanging up after 3 tokens; counted: streams that
did not end with all their tokens and ``[DONE]``, and whether the server was idle again
afterwards (every KV block free, nothing running or queued). Then each kill: SIGKILL of the
engine process while a stream runs; counted: how that stream ended, the seconds until
/health answers 200 again, and whether a request is then served.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tiny_server import burst_client, local_url, report, running, tiny_serve_cmd  # noqa: E402

TOKENS = 24


async def client(c: httpx.AsyncClient, url: str, i: int, hang_up: bool) -> str | None:
    body = {"prompt": [1 + i % 90, 2, 3], "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
    n = 0
    try:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return None if n == TOKENS else f"{n} tokens"
                if line.startswith("data: "):
                    n += 1
                    if hang_up and n == 3:
                        return None
    except httpx.HTTPError as e:
        return type(e).__name__
    return "no [DONE]"


async def storm(url: str, clients: int) -> list[str]:
    async with burst_client(timeout=300) as c:
        out = await asyncio.gather(*(client(c, url, i, i % 3 == 0) for i in range(clients)))
    return [e for e in out if e is not None]


def idle(url: str) -> bool:
    for _ in range(300):              # the engine frees aborted requests at its next step
        ld = httpx.get(url + "/load", timeout=10).json()
        if ld["free_blocks"] == ld["num_blocks"] and ld["num_requests"] == 0 and ld["num_requests_in_server"] == 0:
            return True
        time.sleep(0.05)
    return False


def engine_pid(server_pid: int) -> int:
    """The server's child with the most memory: the engine (torch and the model), not the
    body-check helper or multiprocessing's resource tracker."""
    def rss(pid: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
    kids = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split()
    return int(max(kids, key=rss))


def kill_once(url: str, server_pid: int) -> dict:
    with httpx.Client(timeout=300) as c:
        with c.stream("POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 1900, "ignore_eos": True,
                                                             "stream": True}) as r:
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data: "))
            os.kill(engine_pid(server_pid), signal.SIGKILL)
            t0 = time.perf_counter()
            tail = [ln for ln in lines if ln.startswith("data: ")]
        ended = "error event" if any('"error"' in ln for ln in tail) else f"ended without error ({len(tail)} events)"
        while c.get(url + "/health").status_code != 200:
            time.sleep(0.05)
        back = time.perf_counter() - t0
        ok = c.post(url + "/v1/completions", json={"prompt": "again", "max_tokens": 3, "ignore_eos": True})
    return {"stream_in_flight": ended, "seconds_to_healthy": round(back, 2), "served_after": ok.status_code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storms", type=int, default=10)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--port", type=int, default=8350)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    url = local_url(args.port)
    with running(tiny_serve_cmd(args.port, "--max-model-len", "2048"), url) as proc:
        storms = []
        for _ in range(args.storms):
            failures = asyncio.run(storm(url, args.clients))
            storms.append({"failed": len(failures), "examples": failures[:3], "idle_after": idle(url)})
        kills = [kill_once(url, proc.pid) for _ in range(args.kills)]
        report({"storms": storms, "kills": kills}, args.json)


if __name__ == "__main__":
    main()
