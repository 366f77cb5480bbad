"""The router's settings: polling, timeouts, limits, access."""

from __future__ import annotations

from dataclasses import dataclass

from fairbatch.server.body_limit import DEFAULT_BODY_TIMEOUT, body_limit


@dataclass
class RouterConfig:
    poll_interval: float = 0.05           # seconds between a backend's load polls
    poll_timeout: float = 2.0             # a poll slower than this fails the backend
    connect_timeout: float = 5.0          # connecting to a backend for a request
    down_poll_interval: float = 0.5       # polls of an unhealthy backend
    failures_to_mark_down: int = 3        # consecutive failed polls that mark a backend unhealthy
    request_timeout: float | None = None  # whole request (None: none; health is the polls' job)
    max_body_bytes: int = body_limit(1 << 17)   # larger bodies: 413 (a server's limit at a 128k context)
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT   # a body slower than this: 408
    api_key: str | None = None            # clients must send it (Bearer) on /v1/*
    protect_admin: bool = False           # ... and on /metrics, /load, /backends
    backend_api_key: str | None = None    # sent on the router's own polls of the backends
    show_backend_details: bool = False    # /backends lists the launcher's pids, nodes, log paths
    loopback_only: bool = False           # bound to loopback: only loopback Host headers
    startup_wait: float | None = None     # wait this long for every backend's first poll (None: 2 x poll timeout + 1 s)

    def __post_init__(self) -> None:
        if self.failures_to_mark_down < 1:
            raise ValueError("--failures-to-mark-down must be >= 1")
