"""fairbatch: SLO-aware LLM serving around the FairBatching scheduler.

``from fairbatch import LLM, SamplingParams`` works as in vLLM. The names are imported
lazily (PEP 562): ``import fairbatch`` and the scheduler core stay free of torch, so the
simulator and routers start fast and run where torch is not installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"    # kept equal to pyproject.toml's version (tests/test_python_api.py)

# public name -> module that defines it
_LAZY = {
    "LLM": "fairbatch.engine.llm",
    "EngineArgs": "fairbatch.engine.llm",
    "SamplingParams": "fairbatch.engine.params",
    "RequestOutput": "fairbatch.engine.params",
    "SLO": "fairbatch.request",
    "Request": "fairbatch.request",
    "SchedulerConfig": "fairbatch.scheduler.base",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:      # for type checkers and IDEs; at run time __getattr__ imports on first use
    from fairbatch.engine.llm import LLM, EngineArgs  # noqa: F401
    from fairbatch.engine.params import RequestOutput, SamplingParams  # noqa: F401
    from fairbatch.request import SLO, Request  # noqa: F401
    from fairbatch.scheduler.base import SchedulerConfig  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fairbatch' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value      # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
