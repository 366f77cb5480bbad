"""Running the app under uvicorn: in the foreground (``fairbatch serve``) or in a
background thread (tests, notebooks, benchmarks that start their own server).

The listening socket is bound before uvicorn starts, so a busy port is one clear error
up front and port 0 gives a free port whose number is known at once.
"""

from __future__ import annotations

import resource
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from fairbatch.server.http_protocol import DEFAULT_HEADER_TIMEOUT, protocol_class


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def default_max_connections() -> int:
    """Connections served at once by default: what the process's file-descriptor limit
    leaves after 128 for everything else (engine socket, model files, logs), at most 4096.
    Past it uvicorn answers 503 rather than let ``accept`` fail for lack of descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - 128))


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may take and how many may be open (``serve`` and ``route``).

    ``header_timeout``: a request head (line + headers) must arrive within it
    (``http_protocol``). ``keep_alive``: an idle connection between requests is closed after
    it. ``max_connections``: connections and requests in progress beyond it get 503
    (uvicorn's ``limit_concurrency``); None: ``default_max_connections()``.
    ``max_header_bytes``: a larger request head is a 400 (h11's limit)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keep_alive: int = 30
    max_connections: int | None = None
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not self.header_timeout > 0:
            raise ValueError("--header-timeout must be positive (seconds)")
        if not self.keep_alive >= 1:
            raise ValueError("--keep-alive-timeout must be >= 1 (seconds)")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("--max-connections must be >= 1")


def _config(app: Any, log_level: str, access_log: bool, limits: ConnectionLimits | None = None) -> uvicorn.Config:
    lim = limits or ConnectionLimits()
    # timeout_graceful_shutdown: streams still open at shutdown are cut after this long.
    return uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_keep_alive=lim.keep_alive,
                          timeout_graceful_shutdown=5, lifespan="on", http=protocol_class(lim.header_timeout),
                          limit_concurrency=lim.max_connections or default_max_connections(),
                          h11_max_incomplete_event_size=lim.max_header_bytes)


def serve_forever(app: Any, sock: socket.socket, *, log_level: str = "info", access_log: bool = False,
                  limits: ConnectionLimits | None = None) -> None:
    """Serve in the foreground until SIGINT / SIGTERM."""
    server = uvicorn.Server(_config(app, log_level, access_log, limits))
    server.run(sockets=[sock])


class ServerThread:
    """``with ServerThread(app) as s: httpx.get(s.url + "/health")`` — uvicorn on a free
    loopback port in a daemon thread; stopped (engine thread included) on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 start_timeout: float = 60.0, limits: ConnectionLimits | None = None) -> None:
        self.app = app
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, log_level, False, limits))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="fairbatch-uvicorn", daemon=True)
        self._start_timeout = start_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
