"""The bench client's event loop: uvloop where installed (the server extra installs it),
else asyncio's. One client process reads every token of every stream; asyncio's selector
loop costs more per socket read than uvloop's, and that loop time is queueing delay for
the next token event."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on uvloop's loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
