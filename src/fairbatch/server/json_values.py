"""Counting the values of a JSON body, in a helper process (``body_precheck``): this module
imports nothing but ``json``, so the helper starts in milliseconds."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


def exit_with_parent() -> None:
    """The helper's initializer: exit once the process that started it is gone (killed,
    crashed), so that no helper outlives its server."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="fairbatch-parent-watch", daemon=True).start()


def max_json_values(max_model_len: int) -> int:
    """Values a request body may hold: two contexts of token ids (a batch of prompts
    included) plus room for the rest (4,096 chat messages of a few fields each)."""
    return 2 * max(0, int(max_model_len)) + 20_000


def count_values(raw: bytes, limit: int) -> tuple[str, Any]:
    """In the helper process: ``("ok", n)``, ``("too_many", n)`` (stopped counting past
    ``limit``) or ``("invalid", (position, reason))``."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return "invalid", (e.pos, e.msg)
    except (UnicodeDecodeError, RecursionError) as e:
        return "invalid", (0, type(e).__name__)
    n = 0
    stack = [obj]
    while stack:
        v = stack.pop()
        n += 1
        if n > limit:
            return "too_many", n
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return "ok", n
