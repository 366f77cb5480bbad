"""Running the app under uvicorn: in the foreground (``fairbatch serve``) or in a
background thread (tests, notebooks, benchmarks that start their own server).

The listening socket is bound before uvicorn starts, so a busy port is one clear error
up front and port 0 gives a free port whose number is known at once.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


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


def _config(app: Any, log_level: str, access_log: bool) -> uvicorn.Config:
    # timeout_graceful_shutdown: streams still open at shutdown are cut after this long.
    return uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_keep_alive=30,
                          timeout_graceful_shutdown=5, lifespan="on")


def serve_forever(app: Any, sock: socket.socket, *, log_level: str = "info", access_log: bool = False) -> None:
    """Serve in the foreground until SIGINT / SIGTERM."""
    server = uvicorn.Server(_config(app, log_level, access_log))
    server.run(sockets=[sock])


class ServerThread:
    """``with ServerThread(app) as s: httpx.get(s.url + "/health")`` — uvicorn on a free
    loopback port in a daemon thread; stopped (engine thread included) on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 start_timeout: float = 60.0) -> None:
        self.app = app
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, log_level, False))
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
