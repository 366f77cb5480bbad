"""Who may call the server: an API key, and the Host header when bound to loopback.

API key, as vLLM's ``--api-key`` / ``VLLM_API_KEY``: with a key set, every ``/v1/*``
request must carry ``Authorization: Bearer <key>``, else 401; ``OPTIONS`` (CORS
pre-flight) passes. ``protected`` adds more path prefixes (the operator endpoints
``/metrics``, ``/profile``, ``/load``, ``/backends`` with ``--api-key-admin``); ``/health``
always stays open, for load balancers and orchestrators. Keys are compared in constant time.

Host check (DNS rebinding): a server bound to 127.0.0.1 trusts that only this machine
reaches it, but a web page can point its own domain at 127.0.0.1 and then talk to the
server from the browser, with that domain in ``Host``. A server bound to a loopback address
answers only requests whose ``Host`` names a loopback address (any port): 421 otherwise.
Starlette's ``TrustedHostMiddleware`` does the same for names, but cuts ``[::1]:8000`` at
the first colon and answers in plain text, hence this one.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Iterable
from typing import Any

from fairbatch.server.errors import error_response

API_KEY_ENV = "FAIRBATCH_API_KEY"
API_PREFIXES = ("/v1",)
ADMIN_PATHS = ("/metrics", "/profile", "/load", "/backends")
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def api_key_from(option: str | None) -> str | None:
    """The key from ``--api-key``, else ``FAIRBATCH_API_KEY``; None (no auth) if neither is set."""
    key = option if option is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_name(value: bytes) -> str:
    """``Host`` without its port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    text = value.decode("latin-1").strip()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class AccessControl:
    """Pure ASGI middleware: the key check, then the Host check (either may be off)."""

    def __init__(self, app: Any, *, api_key: str | None = None, protected: Iterable[str] = API_PREFIXES,
                 loopback_only: bool = False) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.protected = tuple(protected)
        self.loopback_only = loopback_only

    def _needs_key(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.protected)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        if self.loopback_only:
            host = headers.get(b"host")
            if host is not None and not is_loopback(_host_name(host)):
                await error_response(421, "unexpected Host header: this server listens on a loopback address "
                                     "and answers only requests addressed to it")(scope, receive, send)
                return
        if self.expected is not None and scope.get("method") != "OPTIONS" and self._needs_key(scope["path"]):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await error_response(401, "Unauthorized: a valid API key is needed (Authorization: Bearer KEY)",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def protected_paths(admin: bool) -> tuple[str, ...]:
    return API_PREFIXES + (ADMIN_PATHS if admin else ())


__all__ = ["API_KEY_ENV", "AccessControl", "api_key_from", "is_loopback", "protected_paths"]
