"""Serve the router from one process or several sharing one listening socket.

One router process forwards every streamed token through one Python event loop, at
~130-215 us of CPU each (``benchmarks/micro/router_overhead.py``): near 7,000 tokens/s new
requests start queueing behind the forwarding, and TTFT grows while the backends are still
on time. ``workers > 1`` runs that many router processes on the same socket (the kernel
spreads connections over them, as with ``uvicorn --workers``). Each worker polls every
backend itself and routes on its own view; loads are shared through the backends'
``/load``, and each worker's sent-since-poll count covers only its own sends, so a
worker's view is at most one poll interval staler about the others' sends.

Metrics: counters and histograms go through prometheus_client's multiprocess mode (one
directory for all workers), so ``/metrics`` on any worker reports the sums; the
``backend_*`` gauges are the answering worker's view.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Mapping, Sequence
from multiprocessing.connection import wait
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("fairbatch.router")


def _setup_logging(log_level: str) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    if log_level.lower() != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)   # a line per load poll otherwise


def _serve_one(backends: Sequence[str], router: str, config: Any, backend_meta: Sequence[Mapping[str, Any]] | None,
               sock: socket.socket, log_level: str, access_log: bool, limits: Any = None) -> None:
    from fairbatch.cluster.router import build_router_app
    from fairbatch.server.runner import serve_forever

    _setup_logging(log_level)
    app = build_router_app(backends, router, config=config, backend_meta=backend_meta)
    serve_forever(app, sock, log_level=log_level, access_log=access_log, limits=limits)


class _Stopped(Exception):
    pass


def serve_router(backends: Sequence[str], router: str, config: Any, sock: socket.socket, *, workers: int = 1,
                 backend_meta: Sequence[Mapping[str, Any]] | None = None, log_level: str = "info",
                 access_log: bool = False, limits: Any = None) -> None:
    """Serve until SIGINT / SIGTERM (or, with several workers, until one of them exits:
    the others are then stopped too, so a broken router never half-serves)."""
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    if workers == 1:
        _serve_one(backends, router, config, backend_meta, sock, log_level, access_log, limits)
        return
    _setup_logging(log_level)
    metrics_dir = tempfile.mkdtemp(prefix="fairbatch-router-metrics-")
    old_env = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir          # the workers import prometheus_client with it set
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_serve_one, name=f"fairbatch-router-{i}",
                         args=(list(backends), router, config, backend_meta, sock, log_level, access_log, limits))
             for i in range(workers)]

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        log.info("router: %d worker processes (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
        wait([p.sentinel for p in procs])
        gone = [p for p in procs if not p.is_alive()]
        log.error("router worker %s exited (code %s): stopping the others",
                  gone[0].name if gone else "?", gone[0].exitcode if gone else "?")
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.is_alive():
                p.terminate()                     # uvicorn: graceful shutdown on SIGTERM
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        if old_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = old_env
        shutil.rmtree(metrics_dir, ignore_errors=True)


__all__ = ["MULTIPROC_ENV", "serve_router"]
