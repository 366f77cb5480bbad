"""The real inference engine: Llama-family models on a paged KV cache, chunked prefill
and mixed batches in one flattened forward pass, driven by the same scheduler policies
and ``Instance`` as the simulator (``EngineExecutor`` is its ``Executor``).

Importing this package does not import torch; the names below load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "Engine", "EngineArgs", "EngineError", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("SamplingParams", "RequestOutput"):
        from fairbatch.engine import params

        return getattr(params, name)
    if name in ("LLM", "Engine", "EngineArgs", "EngineError"):
        from fairbatch.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'fairbatch.engine' has no attribute {name!r}")
