"""What the abuse benchmarks share: a `fairbatch serve` (or `fairbatch route`) subprocess on
127.0.0.1 that is healthy while in use and terminated afterwards, an HTTP client for bursts,
and how a result is reported (printed as JSON, and written to ``--json`` if given).

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_server import report, tiny_server

    with tiny_server(8360, "--max-num-seqs", "64") as url:
        report({"status": httpx.get(url + "/health").status_code}, args.json)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

FAIRBATCH = [sys.executable, "-c", "from fairbatch.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "200"}
# tiny-llama with random weights on one CPU thread, quiet logs
TINY_SERVE = ["serve", "--model", "tiny-llama", "--load-format", "dummy", "--cpu-threads", "1",
              "--log-level", "warning"]


def local_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen | None = None, tries: int = 600, interval: float = 0.2) -> None:
    """Until ``url``/health answers 200; SystemExit if ``proc`` exits first or it never does."""
    for _ in range(tries):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server for {url} exited (status {proc.returncode}) before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise SystemExit(f"{url} did not become healthy within {tries * interval:g} s")


@contextmanager
def running(cmd: list[str], url: str | None = None, tries: int = 600) -> Iterator[subprocess.Popen]:
    """``fairbatch`` with the arguments ``cmd`` as a subprocess, terminated on exit; with
    ``url``, healthy there on entry (without, the caller waits: see ``wait_healthy``)."""
    proc = subprocess.Popen(FAIRBATCH + cmd, env=ENV)
    try:
        if url is not None:
            wait_healthy(url, proc, tries)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def tiny_serve_cmd(port: int, *extra: str) -> list[str]:
    """`serve` arguments for tiny-llama (dummy weights, one CPU thread) on ``port``."""
    return TINY_SERVE + ["--port", str(port), *extra]


@contextmanager
def tiny_server(port: int, *extra: str) -> Iterator[str]:
    """A tiny-llama `fairbatch serve` on 127.0.0.1:``port`` (more serve options in ``extra``);
    yields its base URL."""
    url = local_url(port)
    with running(tiny_serve_cmd(port, *extra), url):
        yield url


def burst_client(timeout: float) -> httpx.AsyncClient:
    """An async client with no cap on connections and none kept alive: every request of a
    burst on a connection of its own."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def write_json(out: dict, path: str | None) -> None:
    """``out`` as indented JSON to ``path``, if given."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


def report(out: dict, path: str | None) -> None:
    """Print ``out`` as indented JSON, and write it to ``path`` if given."""
    print(json.dumps(out, indent=2))
    write_json(out, path)
