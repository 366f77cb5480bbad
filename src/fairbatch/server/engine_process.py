"""The engine in its own process, as vLLM V1 runs its EngineCore: ``spawn_engine`` starts
it and returns the model's ``ModelInfo`` and a ``ProcessBackend`` for ``AsyncEngine``.

Why a process: a GPU step is hundreds of torch calls, each of which releases and re-takes
the GIL. In one process with a busy event loop (hundreds of SSE streams), each re-take
waits for the loop to yield, and steps stretch several-fold (``engine_thread`` has the
numbers). In its own process the engine's only other thread is idle.

Wire: one duplex ``multiprocessing`` pipe of pickled ``(kind, payload)`` tuples. Front end
to engine: ``add`` / ``abort`` / ``load`` / ``stop``; engine to front end: ``ready`` or
``failed`` once, then ``deltas`` / ``load`` / ``snapshot`` (see ``engine_loop``). The front
end reads on the event loop (``add_reader``) and writes from a small writer thread, so
neither side's event loop or step ever blocks on the other. The engine exits when the
pipe closes (the server died) and ignores SIGINT (Ctrl-C reaches the whole process group;
the server stops it in order).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from fairbatch.server.engine_loop import Command, EngineLoop
from fairbatch.server.model import ModelInfo

log = logging.getLogger("fairbatch.server")


class EngineStartError(ValueError):
    """The engine process could not load the model (the message says why, in one line)."""


def spawn_engine(load_kwargs: dict[str, Any], *, name: str | None = None, warmup: bool = True,
                 start_timeout: float = 3600.0, log_level: str = "INFO") -> tuple[ModelInfo, "ProcessBackend"]:
    """Start an engine process that builds ``load_served_model(**load_kwargs)``, warms it up
    (CUDA only) and serves. Returns once it is ready; raises ``EngineStartError`` if it fails."""
    ctx = mp.get_context("spawn")          # never fork a process that may hold CUDA or threads
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_engine_main, args=(child, load_kwargs, name, warmup, log_level),
                       name="fairbatch-engine", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(start_timeout):
            raise EngineStartError(f"the engine did not start within {start_timeout:g} s")
        kind, payload = parent.recv()
    except (EOFError, OSError):
        proc.join(5)
        raise EngineStartError(f"the engine process exited during start-up (exit code {proc.exitcode})") from None
    except BaseException:
        _terminate(proc)
        raise
    if kind != "ready":
        proc.join(10)
        if proc.is_alive():
            _terminate(proc)
        raise EngineStartError(str(payload))
    return payload, ProcessBackend(proc, parent)


def _terminate(proc: Any) -> None:
    proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


class ProcessBackend:
    # The engine steps its own copies of the requests: the front end mirrors every delta.
    mirrors = True

    def __init__(self, proc: Any, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.error: str | None = None
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[str, Any], None] | None = None
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[str, Any], None]) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        self._on_message = on_message
        self._writer = threading.Thread(target=self._write, name="fairbatch-engine-writer", daemon=True)
        self._writer.start()
        loop.add_reader(self.conn.fileno(), self._readable)

    def _write(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                return           # the engine is gone; the reader reports it

    def _readable(self) -> None:
        assert self._on_message is not None
        try:
            while self.conn.poll():
                kind, payload = self.conn.recv()
                self._on_message(kind, payload)
        except (EOFError, OSError):
            self._gone()

    def _gone(self) -> None:
        if self._loop is not None and not self._closed:
            self._loop.remove_reader(self.conn.fileno())
        if self._closed:
            return
        self.proc.join(1)
        code = self.proc.exitcode
        self.error = "the engine process exited" + (f" (exit code {code})" if code is not None else "")
        log.error("%s", self.error)
        self._closed = True
        if self._on_message is not None:
            self._on_message("dead", self.error)

    def send(self, kind: str, payload: Any) -> None:
        if not self._closed:
            self._outbox.put((kind, payload))

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and not self._closed:
            try:
                self._loop.remove_reader(self.conn.fileno())
            except (OSError, ValueError):
                pass
        self._closed = True
        self._outbox.put(("stop", None))
        self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(timeout)
        self.proc.join(timeout)
        if self.proc.is_alive():
            _terminate(self.proc)
        self.conn.close()

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.is_alive()


# --- the engine process ----------------------------------------------------------------------------
def _engine_main(conn: Connection, load_kwargs: dict[str, Any], name: str | None, warmup: bool,
                 log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s[engine]: %(message)s")
    from fairbatch.server.commands import load_served_model

    try:
        served = load_served_model(served_model_name=name, **load_kwargs)
        served.thread_init()
        if warmup and served.device.startswith("cuda"):
            from fairbatch.server.warmup import warm_up

            warm_up(served.llm)
    except (ValueError, OSError) as e:      # the user's mistake: one line
        conn.send(("failed", str(e)))
        return
    except BaseException as e:   # noqa: BLE001 - a bug: say where, then exit
        conn.send(("failed", f"engine start-up failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", served.info))

    stopping = False

    def receive(timeout: float) -> list[Command]:
        nonlocal stopping
        cmds: list[Command] = []
        try:
            if not conn.poll(timeout):
                return cmds
            while conn.poll():
                kind, payload = conn.recv()
                if kind == "stop":
                    stopping = True
                    break
                cmds.append((kind, payload))
        except (EOFError, OSError):
            stopping = True          # the server is gone
        return cmds

    def post(kind: str, payload: Any) -> None:
        nonlocal stopping
        try:
            conn.send((kind, payload))
        except (OSError, ValueError):
            stopping = True

    loop = EngineLoop(served.instance, post)
    code = 0
    try:
        loop.run(receive, lambda: stopping)
    except BaseException:   # noqa: BLE001 - a bug in the loop itself: log it; the server sees the pipe close
        log.exception("the engine loop failed")
        code = 1
    finally:
        try:
            conn.close()
        except OSError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)   # skip interpreter teardown of CUDA state


__all__ = ["EngineStartError", "ProcessBackend", "spawn_engine"]
