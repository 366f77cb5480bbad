"""Routing policies: which instance gets a new request.

Shared by the cluster simulator and the HTTP router. A router sees each instance's
``Load`` (possibly stale: real routers poll) and the new request's prompt length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

from fairbatch.scheduler.base import Load


class Router(ABC):
    name: ClassVar[str] = "abstract"
    uses_load: ClassVar[bool] = True   # False: the router never reads Load (no polling needed)

    @abstractmethod
    def choose(self, prompt_len: int, loads: Sequence[Load]) -> int:
        """Index of the instance that gets a request with ``prompt_len`` prompt tokens."""


class RoundRobinRouter(Router):
    name = "round_robin"
    uses_load = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, prompt_len: int, loads: Sequence[Load]) -> int:
        i = self._next % len(loads)
        self._next = i + 1
        return i


class LeastRequestsRouter(Router):
    """vLLM data-parallel style: fewest running + waiting requests."""

    name = "least_requests"

    def choose(self, prompt_len: int, loads: Sequence[Load]) -> int:
        return min(range(len(loads)), key=lambda i: (loads[i].running + loads[i].waiting, i))


class LlumnixRouter(Router):
    """Llumnix's freeness: free KV blocks per queued-or-running request, highest wins."""

    name = "llumnix"

    def choose(self, prompt_len: int, loads: Sequence[Load]) -> int:
        def freeness(ld: Load) -> float:
            return ld.free_blocks / (ld.running + ld.waiting + 1)
        return max(range(len(loads)), key=lambda i: (freeness(loads[i]), -i))


class AdmissionRouter(Router):
    """FairBatching's admission budget: among instances whose budget covers the prompt,
    the one with the largest budget; when none does, the least over-committed one
    (largest, i.e. least negative, remaining budget)."""

    name = "admission"

    def choose(self, prompt_len: int, loads: Sequence[Load]) -> int:
        return max(range(len(loads)), key=lambda i: (loads[i].admission_budget, -i))


_ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (RoundRobinRouter, LeastRequestsRouter, LlumnixRouter, AdmissionRouter)
}


def router_names() -> list[str]:
    return list(_ROUTERS)


def make_router(name: str) -> Router:
    try:
        return _ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(_ROUTERS)}") from None
