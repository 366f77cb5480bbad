"""A tiny HTTP endpoint that serves the scheduler's load estimate as JSON.

vLLM runs its scheduler in the engine-core process, and what that process hands to the
API server's metrics is a fixed set of fields; a router that wants FairBatching's
admission budget reads it here instead: ``GET http://HOST:PORT/load``. Runs on a daemon
thread and only reads a snapshot dict the scheduler replaces each step.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoadServer:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0) -> None:
        get = snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path not in ("/load", "/"):
                    self.send_error(404, "try /load")
                    return
                body = json.dumps(get()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fairbatch-load", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/load"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
