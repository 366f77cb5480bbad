"""The engine in its own process, as vLLM V1 runs its EngineCore: ``spawn_engine`` starts
it and returns the model's ``ModelInfo`` and a ``ProcessBackend`` for ``AsyncEngine``.

Why a process: a GPU step is hundreds of torch calls, each of which releases and re-takes
the GIL. In one process with a busy event loop (hundreds of SSE streams), each re-take
waits for the loop to yield, and steps stretch several-fold (``engine_thread`` says more).
In its own process the engine has the GIL to itself.

Wire: a socket pair carrying the pickled messages of ``engine_messages``, each framed by an
8-byte length. Front end to engine: ``AddRequests`` / ``AbortRequests`` / ``LoadQuery`` /
``Stop``; engine to front end: ``EngineReady`` or ``EngineFailed`` once, then the engine
loop's messages (``StepDeltas``, ``LoadReply``, ``SnapshotUpdate``, ...).
The front end's end is an asyncio stream on the server's event loop (whatever loop uvicorn
picked; uvloop switches the socket to non-blocking, which asyncio streams expect), so it
never blocks on the engine; the engine's end is a plain blocking socket it polls between
steps. The engine exits when the socket closes (the server died) and ignores SIGINT (Ctrl-C
reaches the whole process group; the server stops it in order).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

from fairbatch.server.engine_loop_overlap import make_engine_loop
from fairbatch.step_ahead import require_overlap
from fairbatch.server.engine_messages import Command, EngineFailed, EngineGone, EngineMessage, EngineReady, Stop
from fairbatch.server.model import ModelInfo

log = logging.getLogger("fairbatch.server")

_HEADER = struct.Struct("!Q")


class EngineStartError(ValueError):
    """The engine process could not load the model (the message says why, in one line)."""


def _frame(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return bytes(buf)


def _recv_msg(sock: socket.socket) -> Any:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


def _socket_of(conn: Any) -> socket.socket:
    """A plain socket on a ``multiprocessing`` pipe end (a socket pair on POSIX)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    sock.setblocking(True)
    return sock


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
    sock = _socket_of(parent)
    try:
        if not select.select([sock], [], [], start_timeout)[0]:
            raise EngineStartError(f"the engine did not start within {start_timeout:g} s")
        msg = _recv_msg(sock)
    except (EOFError, OSError):
        proc.join(5)
        sock.close()
        raise EngineStartError(f"the engine process exited during start-up (exit code {proc.exitcode})") from None
    except BaseException:
        sock.close()
        _terminate(proc)
        raise
    if not isinstance(msg, EngineReady):
        sock.close()
        proc.join(10)
        if proc.is_alive():
            _terminate(proc)
        raise EngineStartError(msg.message if isinstance(msg, EngineFailed) else f"unexpected start-up message {msg!r}")
    return msg.info, ProcessBackend(proc, sock)


def _terminate(proc: Any) -> None:
    proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


class ProcessBackend:
    # The engine steps its own copies of the requests: the front end mirrors every delta.
    mirrors = True

    def __init__(self, proc: Any, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.error: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: list[bytes] = []          # sent before the stream exists
        self._reader_task: asyncio.Task | None = None
        self._on_message: Callable[[EngineMessage], None] | None = None
        self._closed = False

    async def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[EngineMessage], None]) -> None:
        if self._on_message is not None:
            return
        self._on_message = on_message
        self.sock.setblocking(False)
        reader, self._writer = await asyncio.open_connection(sock=self.sock, limit=1 << 26)
        for frame in self._pending:
            self._writer.write(frame)
        self._pending.clear()
        self._reader_task = loop.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        on_message = self._on_message
        assert on_message is not None
        try:
            while True:
                (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                on_message(pickle.loads(await reader.readexactly(n)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return
        except Exception:   # noqa: BLE001 - a bad message: say so, then treat the engine as gone
            log.exception("engine process: unreadable message")
        if not self._closed:
            await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 2.0)
            code = self.proc.exitcode
            self.error = "the engine process exited" + (f" (exit code {code})" if code is not None else "")
            log.error("%s", self.error)
            self._closed = True
            on_message(EngineGone(self.error))

    def send(self, cmd: Command) -> None:
        if self._closed:
            return
        frame = _frame(cmd)
        if self._writer is None:
            self._pending.append(frame)
        else:
            self._writer.write(frame)

    async def stop(self, timeout: float = 10.0) -> None:
        was_closed = self._closed
        self._closed = True
        if self._writer is not None and not was_closed:
            try:
                self._writer.write(_frame(Stop()))
                await asyncio.wait_for(self._writer.drain(), timeout)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                pass
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, timeout)
        if self.proc.is_alive():
            _terminate(self.proc)
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.is_alive()


# --- the engine process ----------------------------------------------------------------------------
def _engine_main(conn: Any, load_kwargs: dict[str, Any], name: str | None, warmup: bool, log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s[engine]: %(message)s")
    sock = _socket_of(conn)
    from fairbatch.server.commands import load_served_model

    try:
        served = load_served_model(served_model_name=name, **load_kwargs)
        served.thread_init()
        ahead = served.llm.engine.args.async_scheduling      # one step ahead (step_ahead.py)
        if ahead:
            require_overlap(served.instance)
        if warmup and served.device.startswith("cuda"):
            from fairbatch.server.warmup import warm_up

            warm_up(served.llm)
    except (ValueError, OSError) as e:      # the user's mistake: one line
        sock.sendall(_frame(EngineFailed(str(e))))
        return
    except BaseException as e:   # noqa: BLE001 - a bug: say where, then exit
        sock.sendall(_frame(EngineFailed(f"engine start-up failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")))
        return
    sock.sendall(_frame(EngineReady(served.info)))

    stopping = False

    def receive(timeout: float) -> list[Command]:
        nonlocal stopping
        cmds: list[Command] = []
        try:
            wait = timeout
            while select.select([sock], [], [], wait)[0]:
                cmd = _recv_msg(sock)
                if isinstance(cmd, Stop):
                    stopping = True
                    break
                cmds.append(cmd)
                wait = 0.0
        except (EOFError, OSError):
            stopping = True          # the server is gone
        return cmds

    def post(msg: EngineMessage) -> None:
        nonlocal stopping
        try:
            sock.sendall(_frame(msg))
        except OSError:
            stopping = True

    loop = make_engine_loop(served.instance, post, async_scheduling=ahead)
    code = 0
    try:
        loop.run(receive, lambda: stopping)
    except BaseException:   # noqa: BLE001 - a bug in the loop itself: log it; the server sees the socket close
        log.exception("the engine loop failed")
        code = 1
    finally:
        try:
            sock.close()
        except OSError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)   # skip interpreter teardown of CUDA state


__all__ = ["EngineStartError", "ProcessBackend", "spawn_engine"]
