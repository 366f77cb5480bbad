"""An engine process that is started again when it dies, a bounded number of times.

Without this, an engine killed by the OOM killer (or a crash in a kernel) leaves the
front end up and useless: ``/health`` says 503 forever and the orchestrator may not
notice for minutes. ``RestartingBackend`` wraps the engine process's backend: when it
dies, the requests in flight fail at once (as before: their output cannot be resumed),
``/health`` answers 503 naming the cause and the restart under way, and a new engine
process is spawned off the event loop; once it is ready ``/health`` is 200 again. After
``max_restarts`` restarts over the server's life it gives up and stays down (503), so a
model that dies on every start is not reloaded forever: the orchestrator replaces the pod.

The front end's ``AsyncEngine`` sees the ordinary backend messages, plus ``EngineRevived``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fairbatch.server.engine_messages import Command, EngineGone, EngineMessage, EngineRevived

log = logging.getLogger("fairbatch.server")


class RestartingBackend:
    mirrors = True

    def __init__(self, backend: Any, respawn: Callable[[], tuple[Any, Any]], *, max_restarts: int = 3) -> None:
        """``backend``: the running engine's ``ProcessBackend``. ``respawn()``: blocking; a new
        ``(ModelInfo, ProcessBackend)`` (``spawn_engine`` with the same arguments)."""
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        self.current = backend
        self.respawn = respawn
        self.max_restarts = max_restarts
        self.restarts = 0
        self.restarting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up: Callable[[EngineMessage], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._gave_up: str | None = None

    async def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[EngineMessage], None]) -> None:
        self._loop = loop
        self._up = on_message
        await self.current.start(loop, self._on_message)

    def _on_message(self, msg: EngineMessage) -> None:
        assert self._up is not None and self._loop is not None
        if not isinstance(msg, EngineGone) or self._stopping:
            self._up(msg)
            return
        if self.restarts >= self.max_restarts:
            self._gave_up = f"{msg.reason}; not restarted (it was restarted {self.restarts} time(s), the limit)"
            log.error("%s", self._gave_up)
            self._up(EngineGone(self._gave_up))
            return
        self.restarts += 1
        self.restarting = True
        why = f"{msg.reason}; restarting it (restart {self.restarts} of {self.max_restarts})"
        log.error("%s", why)
        self._up(EngineGone(why))           # the requests in flight fail now, /health says why
        self._task = self._loop.create_task(self._restart(msg.reason))

    async def _restart(self, cause: str) -> None:
        assert self._loop is not None and self._up is not None
        try:
            _, backend = await self._loop.run_in_executor(None, self.respawn)
        except Exception as e:   # noqa: BLE001 - the model no longer loads: stay down, say why
            self.restarting = False
            self._gave_up = f"{cause}; the restart failed: {e}"
            log.error("%s", self._gave_up)
            self._up(EngineGone(self._gave_up))
            return
        if self._stopping:
            await backend.stop()
            return
        self.current = backend
        await backend.start(self._loop, self._on_message)
        self.restarting = False
        log.warning("engine process restarted (restart %d of %d)", self.restarts, self.max_restarts)
        self._up(EngineRevived(self.restarts))

    def send(self, cmd: Command) -> None:
        if not self.restarting:
            self.current.send(cmd)

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()         # a spawn under way finishes on its thread; its process is a daemon
        await self.current.stop(timeout)

    @property
    def alive(self) -> bool:
        return not self.restarting and self._gave_up is None and self.current.alive

    @property
    def error(self) -> str | None:
        if self._gave_up is not None:
            return self._gave_up
        if self.restarting:
            return f"the engine process is restarting (restart {self.restarts} of {self.max_restarts})"
        return self.current.error


__all__ = ["RestartingBackend"]
