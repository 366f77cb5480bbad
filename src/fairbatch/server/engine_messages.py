"""Every message between the server's front end (``async_engine``) and the engine loop
(``engine_loop``), one frozen dataclass per kind, dispatched on type. They cross a process
boundary pickled (``engine_process``) or a thread boundary as they are (``engine_thread``).

Front end to engine (``Command``): ``AddRequests``, ``AbortRequests``, ``LoadQuery``,
``DeliveryDelays`` (how long first tokens took from their step to their client, for
``ttft_margin_quantile``); and ``Stop``, which only the process transport sees (it ends the
engine's loop).

Engine to front end (``EngineMessage``):

- at start-up, once, from the engine process: ``EngineReady`` or ``EngineFailed``;
- ``StepDeltas`` once per step: each request's new tokens (``Delta``). A request the
  scheduler refused (``late=reject``), at ``add`` or while queued or part-way through its
  prefill, gets one final delta with ``finish_reason == "rejected"`` and no tokens;
- ``LoadReply`` answers a ``LoadQuery`` (same token);
- ``SnapshotUpdate`` every few tens of milliseconds (``EngineSnapshot``, for /metrics);
- ``LateCounts`` whenever the scheduler's late-request counts changed, before the deltas
  that follow them (a client that got its answer and then reads /metrics sees its request
  counted);
- ``LatencyProfile`` at start and after each accepted refit of the step-time model.

A backend adds two of its own: ``EngineGone`` when the engine died (or its thread), and
``EngineRevived`` when a restarted engine process serves again (``engine_restart``).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from fairbatch.request import Request
    from fairbatch.scheduler.base import Load
    from fairbatch.server.model import ModelInfo

REJECTED = "rejected"      # Delta.finish_reason of a request the scheduler refused (late=reject)


# --- payloads --------------------------------------------------------------------------------------
@dataclass(slots=True)
class Delta:
    """What one step produced for one request."""

    token_ids: list[int]
    # "stop" | "length" when the request finished; "rejected" when the scheduler refused it
    # (late=reject: it could not meet its TTFT; it never produced a token)
    finish_reason: str | None = None
    error: str | None = None              # the engine failed this request
    time: float = 0.0                     # end of the step that produced the tokens
    start: int = 0                        # index of the first of token_ids in the output
    # for requests that asked: per token of token_ids, its logprob entries
    # ``[(token id, logprob, rank), ...]`` (the token first, then the top k)
    logprobs: list | None = None
    # for requests that asked, once, with their first tokens: per prompt position, its
    # entries (None for position 0, which nothing scores)
    prompt_logprobs: list | None = None
    # with the first tokens: when the request was first scheduled (the end of its queue
    # time, vLLM's scheduled_ts) and how many of its prompt tokens the prefix cache held
    # then (vLLM's num_cached_tokens); with the last: its preemptions
    scheduled: float | None = None
    cached_tokens: int | None = None
    num_preemptions: int = 0

    def __reduce__(self) -> tuple[type, tuple]:
        # the fields by position: pickle's default for slots writes a name -> value dict
        # per delta, and a step's deltas (one per running request) cross to the front end
        # every step; this form unpickles in about a third of the time
        return Delta, _delta_fields(self)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def rejected(self) -> bool:
        return self.finish_reason == REJECTED


_delta_fields = attrgetter(*Delta.__slots__)      # every field, in the constructor's order


@dataclass(slots=True)
class EngineSnapshot:
    """Cheap state for /metrics, refreshed by the engine."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    free_blocks: int = 0
    num_blocks: int = 0
    preemptions: int = 0
    steps: int = 0
    admission_budget: float = 0.0
    queued_prefill_tokens: int = 0
    step_errors: int = 0
    # Cumulative over the steps that ran: measured execution time, the latency model's
    # prediction for the same steps (their ratio is the simulator's fidelity on this host),
    # wall time from each step's start to the next one's (scheduling, hand-off and new
    # commands included; to the end of its hand-off when the engine then went idle), new tokens.
    step_seconds: float = 0.0
    step_predicted_seconds: float = 0.0
    busy_seconds: float = 0.0
    step_tokens: int = 0
    steps_run: int = 0
    latency_refits: int = 0
    latency_refit_attempts: int = 0
    # the scheduler's late-request counts (late=relegate|reject): refused, put behind
    rejected: int = 0
    relegated: int = 0
    # steps by tokens computed: counts per engine_loop.ITERATION_TOKENS_BUCKETS bucket (+Inf last)
    iteration_tokens: tuple[int, ...] = ()
    # prompt tokens looked up in the prefix cache and found there (the allocator's counts;
    # 0 and 0 with caching off, as vLLM's)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    time: float = 0.0


# --- front end -> engine ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddRequests:
    """The engine requests of one HTTP request (one per choice), all or none."""

    requests: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class AbortRequests:
    """Drop these requests and free their KV blocks (at the next step boundary)."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoadQuery:
    """Ask for a fresh ``Scheduler.load``; answered by a ``LoadReply`` with the same token."""

    token: int


@dataclass(frozen=True, slots=True)
class DeliveryDelays:
    """Seconds from the end of the step that made each of these first tokens to the front
    end handing it to its client (``Scheduler.observe_delivery``)."""

    delays: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """End the engine process's loop (it drops what is left, then exits)."""


Command = Union[AddRequests, AbortRequests, LoadQuery, DeliveryDelays]


# --- engine -> front end ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EngineReady:
    info: ModelInfo


@dataclass(frozen=True, slots=True)
class EngineFailed:
    message: str                          # why it could not start, in one line (or a traceback)


@dataclass(frozen=True, slots=True)
class StepDeltas:
    deltas: tuple[tuple[str, Delta], ...]     # (request id, what the step produced for it)


@dataclass(frozen=True, slots=True)
class LoadReply:
    token: int
    load: Load | None
    error: str | None = None              # the policy's estimate failed (then load is None)


@dataclass(frozen=True, slots=True)
class SnapshotUpdate:
    snapshot: EngineSnapshot


@dataclass(frozen=True, slots=True)
class LateCounts:
    rejected: int
    relegated: int


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    profile: dict[str, Any]               # the step-time model's profile form (``fairbatch simulate --profile``)


@dataclass(frozen=True, slots=True)
class EngineGone:
    reason: str


@dataclass(frozen=True, slots=True)
class EngineRevived:
    restarts: int


EngineMessage = Union[StepDeltas, LoadReply, SnapshotUpdate, LateCounts, LatencyProfile, EngineGone, EngineRevived]

__all__ = ["REJECTED", "AbortRequests", "AddRequests", "Command", "Delta", "DeliveryDelays", "EngineFailed", "EngineGone",
           "EngineMessage", "EngineReady", "EngineRevived", "EngineSnapshot", "LateCounts", "LatencyProfile",
           "LoadQuery", "LoadReply", "SnapshotUpdate", "Stop", "StepDeltas"]
