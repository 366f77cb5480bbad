"""What `fairbatch route` costs per streamed token, without a GPU: two paced fake OpenAI
backends (first token after --ttft-ms, then one token every --itl-ms, /load always
roomy), `fairbatch route` in front, and `fairbatch bench` replaying the conversation trace
through the router and, for comparison, straight at one backend (which then carries the
whole load). Prints, per rate scale, TTFT through the router vs direct and the router
process's CPU seconds per thousand streamed tokens (from /proc: Linux only).

The backends stream at a fixed pace whatever the load, so any TTFT the router adds is the
router's: once its one event loop is busy forwarding tokens, new requests queue behind
them.

    PYTHONPATH=src python benchmarks/micro/router_overhead.py --num 600 --scales 3 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

FB = [sys.executable, "-m", "fairbatch.cli"]


def fake_backend_app(ttft: float, itl: float) -> FastAPI:
    app = FastAPI()
    running = [0]

    @app.get("/load")
    async def load() -> dict:
        return {"running": running[0], "waiting": 0, "kv_usage": 0.0, "free_blocks": 10**6, "num_blocks": 10**6,
                "queued_prefill_tokens": 0, "admission_budget": 1e9, "time": time.perf_counter()}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "llama-3-8b", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        n = int((await request.json()).get("max_tokens", 16))

        async def events():  # noqa: ANN202
            running[0] += 1
            try:
                await asyncio.sleep(ttft)
                for i in range(n):
                    choice = {"index": 0, "text": "a", "finish_reason": "length" if i == n - 1 else None}
                    yield b"data: " + json.dumps({"id": "x", "object": "text_completion",
                                                  "choices": [choice]}).encode() + b"\n\n"
                    await asyncio.sleep(itl)
                usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
                yield b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                running[0] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def wait_up(url: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live child processes (a multi-worker router's workers)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def bench(url: str, args: argparse.Namespace, scale: float, out: Path) -> dict:
    cmd = FB + ["bench", "--base-url", url, "--model", "llama-3-8b", "--trace", "azure-conv", "--num-prompts",
                str(args.num), "--rate-scale", f"{scale:g}", "--no-save-detailed", "--save-result", str(out),
                "--workers", str(args.bench_workers)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench against {url} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    d = json.loads(out.read_text())
    return d["runs"][0] if "runs" in d else d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)   # internal: run one backend on this port
    ap.add_argument("--num", type=int, default=600)
    ap.add_argument("--scales", type=float, nargs="+", default=[3.0, 6.0])
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--itl-ms", type=float, default=15.0)
    ap.add_argument("--port", type=int, default=9300)
    ap.add_argument("--router-workers", type=int, default=1, help="`fairbatch route --workers`")
    ap.add_argument("--bench-workers", type=int, default=1, help="`fairbatch bench --workers`")
    args = ap.parse_args()
    if args.serve_fake:
        import uvicorn
        uvicorn.run(fake_backend_app(args.ttft_ms / 1e3, args.itl_ms / 1e3), host="127.0.0.1", port=args.serve_fake,
                    log_level="warning")
        return
    procs = []
    work = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    try:
        urls = []
        for k in (1, 2):
            port = args.port + k
            procs.append(subprocess.Popen([sys.executable, __file__, "--serve-fake", str(port), "--ttft-ms",
                                           str(args.ttft_ms), "--itl-ms", str(args.itl_ms)]))
            urls.append(f"http://127.0.0.1:{port}")
        router = subprocess.Popen(FB + ["route", *sum((["--backend", u] for u in urls), []), "--port",
                                        str(args.port), "--log-level", "warning", "--workers",
                                        str(args.router_workers)])
        procs.append(router)
        for u in urls + [f"http://127.0.0.1:{args.port}"]:
            wait_up(u)
        rows = []
        for scale in args.scales:
            c0 = cpu_seconds(router.pid)
            via = bench(f"http://127.0.0.1:{args.port}", args, scale, work / f"router_{scale:g}.json")
            cpu = cpu_seconds(router.pid) - c0
            direct = bench(urls[0], args, scale, work / f"direct_{scale:g}.json")
            rows.append((scale, via, direct, cpu))
        print(f"{'scale':>5s} {'req/s':>6s} {'tok/s':>6s} {'TTFT p50 router/direct':>23s} "
              f"{'TTFT p99 router/direct':>23s} {'router CPU ms/1k tok':>21s}")
        for scale, via, direct, cpu in rows:
            tokens = via["total_output_tokens"]
            print(f"{scale:5g} {via['request_rate']:6.1f} {tokens / via['duration']:6.0f} "
                  f"{via['median_ttft_ms']:11.0f} / {direct['median_ttft_ms']:<9.0f} "
                  f"{via['p99_ttft_ms']:11.0f} / {direct['p99_ttft_ms']:<9.0f} {1e6 * cpu / tokens:21.0f}")
    finally:
        for p in reversed(procs):      # the router (and its workers) first: no "backend down" warnings
            p.terminate()
            p.wait(15)


if __name__ == "__main__":
    main()
