"""Helpers shared by the server and router tests: waiting on a condition, reading a
Prometheus counter."""

from __future__ import annotations

import time


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    """Until ``pred()`` holds (the timeout only turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a /metrics text whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total
