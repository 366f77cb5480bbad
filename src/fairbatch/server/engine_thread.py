"""``ThreadBackend``: the engine loop on a thread of the server's own process.

For tests, notebooks and small CPU models, where one process is simpler. It shares the
GIL with the event loop: every torch op releases and re-takes the GIL, and while the loop
is busy (many streams) each re-take waits for the switch interval, so a GPU step of a few
hundred ops can stretch many times over. ``fairbatch serve`` therefore runs the engine in
its own process (``engine_process``); this backend is the in-process alternative.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from fairbatch.server.engine_loop_overlap import make_engine_loop
from fairbatch.server.engine_messages import Command, EngineGone, EngineMessage

log = logging.getLogger("fairbatch.server")


class ThreadBackend:
    # The engine mutates the very Request objects the front end holds: nothing to mirror.
    mirrors = False

    def __init__(self, model: Any, *, idle_wait: float = 0.5) -> None:
        self.model = model                       # an in-process ServedModel
        self._idle_wait = idle_wait
        llm = getattr(model, "llm", None)     # one step ahead (step_ahead.py) when the engine was built so
        self._async = llm is not None and llm.engine.args.async_scheduling
        self._inbox: deque[Command] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    async def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[EngineMessage], None]) -> None:
        if self._thread is not None:
            return
        self._stopping = False

        def post(msg: EngineMessage) -> None:
            try:
                loop.call_soon_threadsafe(on_message, msg)
            except RuntimeError:
                pass   # the loop is closed: nobody is listening any more

        engine = make_engine_loop(self.model.instance, post, idle_wait=self._idle_wait, async_scheduling=self._async)

        def run() -> None:
            try:
                self.model.thread_init()
                engine.run(self._receive, lambda: self._stopping)
            except BaseException as e:   # noqa: BLE001 - record why, fail everything, never hang clients
                self.error = f"engine thread died: {type(e).__name__}: {e}"
                log.error("%s\n%s", self.error, traceback.format_exc())
                self._stopping = True
                engine.drop_all(self.error, notify=False)
                post(EngineGone(self.error))

        self._thread = threading.Thread(target=run, name="fairbatch-engine", daemon=True)
        self._thread.start()

    def _receive(self, timeout: float) -> list[Command]:
        if timeout > 0 and not self._inbox:
            self._wake.wait(timeout)
        with self._lock:
            cmds = list(self._inbox)
            self._inbox.clear()
            self._wake.clear()
        return cmds

    def send(self, cmd: Command) -> None:
        with self._lock:
            self._inbox.append(cmd)
        self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)       # at most one step: the loop checks between steps
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping


__all__ = ["ThreadBackend"]
