"""Request state, per-request SLO and per-token deadlines (no dependencies).

Token accounting follows vLLM V1: a request owns ``num_tokens = prompt_len + generated``
known tokens, of which ``num_computed`` already have KV in the cache. A step that
computes ``k`` more tokens and reaches ``num_tokens`` samples one new output token;
otherwise it was a partial (chunked) prefill. Decodes, chunked prefills and the
recompute after a preemption are therefore one mechanism.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from enum import Enum
from typing import Any


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency objectives of one request, in seconds. ``name`` is its SLO class."""

    ttft: float
    tpot: float
    name: str = "default"

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tpot > 0):
            raise ValueError(f"SLO needs positive ttft and tpot, got ttft={self.ttft} tpot={self.tpot}")


class DeadlineRule(str, Enum):
    """How the deadline of output token ``j`` (0 = first token) is set.

    ``envelope``: the paper's ``arrival + ttft + tpot * j``. A request whose first token
    came early earns slack that the scheduler may spend by deferring its decodes, and its
    mean TPOT (vLLM's definition, measured from the first token) can then exceed the SLO.

    ``tpot-safe`` (default): ``min(envelope, first_token_time + tpot * j)``: meeting every
    deadline then also guarantees vLLM-style TPOT <= tpot.
    """

    ENVELOPE = "envelope"
    TPOT_SAFE = "tpot-safe"


class RequestState(str, Enum):
    WAITING = "waiting"      # queued, never admitted or preempted back to the queue
    RUNNING = "running"      # admitted: holds KV blocks
    FINISHED = "finished"
    ABORTED = "aborted"
    REJECTED = "rejected"    # refused by the scheduler: could not meet its SLO (``late=reject``)


_DONE = frozenset({RequestState.FINISHED, RequestState.ABORTED, RequestState.REJECTED})


class Request:
    """One generation request as the scheduler sees it.

    Slotted and free of properties on the hot path: the simulator touches every
    running request every step.
    """

    __slots__ = (
        "request_id", "arrival", "prompt_len", "max_new_tokens", "slo", "deadline_rule",
        "prompt_token_ids", "output_token_ids", "sampling", "priority",
        "state", "num_computed", "generated", "first_token_time", "token_times",
        "finish_time", "finish_reason", "num_preemptions", "_safe", "pace", "deadline", "kv_slots", "ttft_missed",
        "admitted_at", "user_data", "relegated", "late_check", "block_hashes", "num_cached_tokens",
    )

    def __init__(
        self,
        request_id: str,
        arrival: float,
        prompt_len: int,
        max_new_tokens: int,
        slo: SLO,
        *,
        deadline_rule: DeadlineRule = DeadlineRule.TPOT_SAFE,
        prompt_token_ids: list[int] | None = None,
        sampling: Any = None,
        priority: int = 0,
    ) -> None:
        if prompt_len < 1:
            raise ValueError(f"request {request_id}: prompt must have at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"request {request_id}: max_new_tokens must be >= 1")
        if prompt_token_ids is not None and len(prompt_token_ids) != prompt_len:
            raise ValueError(f"request {request_id}: prompt_len != len(prompt_token_ids)")
        self.request_id = request_id
        self.arrival = float(arrival)
        self.prompt_len = int(prompt_len)
        self.max_new_tokens = int(max_new_tokens)
        self.slo = slo
        self.deadline_rule = DeadlineRule(deadline_rule)
        self._safe = self.deadline_rule is DeadlineRule.TPOT_SAFE
        # interval between successive tokens' deadlines: the SLO's TPOT, or less where a
        # policy paces with a safety margin (set_pace); the SLO itself is unchanged
        self.pace = slo.tpot
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.sampling = sampling          # engine-side sampling parameters (opaque here)
        self.priority = priority
        self.state = RequestState.WAITING
        self.num_computed = 0             # tokens whose KV is in the cache
        self.generated = 0                # output tokens produced so far
        self.first_token_time: float | None = None
        self.token_times = array("d")     # time of every output token, in order
        self.finish_time: float | None = None
        self.finish_reason: str | None = None   # "length" | "stop" | "abort" | "rejected"
        self.num_preemptions = 0
        self.deadline = self.arrival + slo.ttft   # of the next output token (kept current)
        self.kv_slots = 0                 # tokens its KV blocks can hold (kept by the scheduler)
        self.ttft_missed = False          # first token came after arrival + ttft
        self.admitted_at = -1             # admission sequence number (policies' FCFS order)
        self.relegated = False            # behind every request that can still meet its SLO
        self.late_check = float("inf")    # when the scheduler next checks it can meet its TTFT
        self.user_data: Any = None        # whatever the substrate wants to attach
        # names of its full prompt blocks (kv.prompt_block_hashes / trace_block_hashes), set
        # by the host; None: this request never uses the prefix cache
        self.block_hashes: list[int] | None = None
        # prompt tokens it found in the prefix cache when first admitted, as vLLM's
        # Request.num_cached_tokens (OpenAI usage: prompt_tokens_details.cached_tokens)
        self.num_cached_tokens = 0

    # --- token accounting -------------------------------------------------------------
    def set_arrival(self, arrival: float) -> None:
        """Re-stamp the arrival of a request built before it was submitted (the server and
        ``LLM.run`` stamp it on submission); the first token's deadline moves with it.
        Assigning ``arrival`` alone would leave that deadline at the old arrival + TTFT."""
        if self.generated:
            raise ValueError(f"request {self.request_id}: arrival cannot change once tokens exist")
        self.arrival = float(arrival)
        self.deadline = self.arrival + self.slo.ttft

    def plan_first_token_early(self, lead: float) -> None:
        """Schedule the first token ``lead`` seconds (at most half the TTFT) before its
        TTFT deadline: a host's margin for delivering it. The SLO, and what counts as
        missing it, are unchanged."""
        if self.generated:
            raise ValueError(f"request {self.request_id}: the first token already exists")
        self.deadline = self.arrival + self.slo.ttft - min(lead, 0.5 * self.slo.ttft)

    def set_pace(self, interval: float) -> None:
        """Space this request's token deadlines ``interval`` apart instead of its TPOT SLO
        (a policy's safety margin). Only before its first token: the deadlines after it are
        kept incrementally from the pace."""
        if self.generated:
            raise ValueError(f"request {self.request_id}: pace cannot change once tokens exist")
        if not interval > 0:
            raise ValueError(f"request {self.request_id}: pace must be positive, got {interval}")
        self.pace = float(interval)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated

    @property
    def pending_tokens(self) -> int:
        """Tokens that must be computed before the next output token can be sampled."""
        return self.prompt_len + self.generated - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        """True until the first output token exists, and again while recomputing."""
        return self.prompt_len + self.generated - self.num_computed > 1 or self.generated == 0

    @property
    def finished(self) -> bool:
        return self.state in _DONE

    # --- deadlines ----------------------------------------------------------------------
    def token_deadline(self, j: int) -> float:
        """Deadline of output token j under this request's rule (and pace)."""
        d = self.arrival + self.slo.ttft + self.pace * j
        if self._safe and self.first_token_time is not None:
            safe = self.first_token_time + self.pace * j
            if safe < d:
                return safe
        return d

    def next_deadline(self) -> float:
        return self.deadline

    # --- events -------------------------------------------------------------------------
    def record_token(self, now: float, token_id: int | None = None) -> None:
        """An output token was produced at ``now``. Runs once per token in every substrate,
        so it keeps the next deadline incrementally: ``d(j) = base + pace*j`` where
        ``base`` is ``arrival + ttft`` (envelope), or ``min(arrival + ttft,
        first_token_time)`` (TPOT-safe), fixed once the first token exists."""
        if self.generated == 0:
            self._first_token_at(now)
        else:
            self.deadline += self.pace
        self.generated += 1
        self.token_times.append(now)
        if token_id is not None:
            self.output_token_ids.append(token_id)

    def _first_token_at(self, now: float) -> None:
        """The first token's time, its TTFT verdict and the deadline of the next token."""
        self.first_token_time = now
        env0 = self.arrival + self.slo.ttft     # (the planned deadline may be earlier)
        self.ttft_missed = now > env0
        base = now if (self._safe and now < env0) else env0
        self.deadline = base + self.pace

    def settle_last_token(self, now: float, token_id: int) -> None:
        """The last recorded token (recorded before its id was known, at a predicted time)
        is ``token_id`` and came at ``now``: its id appended, its time and, for a first
        token, the TTFT verdict and the deadline base moved to ``now``."""
        self.output_token_ids.append(token_id)
        self.token_times[-1] = now
        if self.generated == 1:
            self._first_token_at(now)
        if self.finish_time is not None and self.state is RequestState.FINISHED:
            self.finish_time = now

    def drop_unsettled_token(self) -> None:
        """Forget the last recorded token, whose id never came (its request was aborted
        while the step producing it was in flight)."""
        self.generated -= 1
        self.token_times.pop()
        if self.generated == 0:
            self.first_token_time = None

    @property
    def max_lateness(self) -> float:
        """Max over produced tokens of (time - envelope deadline); <= 0 means the request
        met its whole envelope. Computed from the token times (not on the hot path)."""
        env0, tpot = self.arrival + self.slo.ttft, self.slo.tpot
        return max((t - env0 - tpot * j for j, t in enumerate(self.token_times)), default=float("-inf"))

    def reset_for_recompute(self) -> None:
        """Preempted: KV is dropped; prompt and generated tokens will be recomputed."""
        self.num_computed = 0
        self.kv_slots = 0
        self.num_preemptions += 1
        self.state = RequestState.WAITING

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, state={self.state.value}, prompt={self.prompt_len}, "
            f"computed={self.num_computed}, generated={self.generated}/{self.max_new_tokens})"
        )
