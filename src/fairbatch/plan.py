"""What one forward pass computes (StepPlan), what it cost (StepResult), and the batch
features that latency models are functions of (StepFeatures). No dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fairbatch.request import Request


def attention_pairs(cached: int, k: int) -> float:
    """Query-key products of a chunk of ``k`` new tokens over ``cached`` cached ones: each
    new token attends every cached token and the new ones up to itself. Exact in a float
    (a multiple of 1/2, far below 2**53), so sums of it are the same in any order."""
    return k * cached + k * (k + 1) * 0.5


@dataclass(slots=True)
class StepFeatures:
    """Sums over the chunks of a step; every latency model is a function of these.

    For a chunk of ``k`` new tokens of a request with ``c`` tokens already cached:
    ``new_tokens += k``; ``context_tokens += c + k`` (KV entries the chunk attends, i.e.
    bytes of KV read); ``attention_pairs += attention_pairs(c, k)`` (query-key products,
    i.e. attention FLOPs; ``c + 1`` for a decode); ``num_seqs += 1``.
    """

    num_seqs: int = 0
    new_tokens: int = 0
    context_tokens: int = 0
    attention_pairs: float = 0.0

    def add(self, cached: int, k: int) -> None:
        self.num_seqs += 1
        self.new_tokens += k
        self.context_tokens += cached + k
        self.attention_pairs += attention_pairs(cached, k)

    def with_chunk(self, cached: int, k: int) -> "StepFeatures":
        return StepFeatures(
            self.num_seqs + 1,
            self.new_tokens + k,
            self.context_tokens + cached + k,
            self.attention_pairs + attention_pairs(cached, k),
        )

    def copy(self) -> "StepFeatures":
        return StepFeatures(self.num_seqs, self.new_tokens, self.context_tokens, self.attention_pairs)

    @staticmethod
    def of_chunks(chunks: list[tuple[Request, int]]) -> "StepFeatures":
        f = StepFeatures()
        for req, k in chunks:
            f.add(req.num_computed, k)
        return f


@dataclass(slots=True)
class StepPlan:
    """The chunks one step computes, in batch order, whom the scheduler preempted, and
    whom it refused (``late=reject``: their KV is already freed).

    ``chunks`` holds ``(request, k)``: compute ``k`` tokens starting at
    ``request.num_computed``; a decode is ``k == 1``. ``features`` is kept up to date by
    the policy that built the plan. ``token_budget`` / ``time_budget`` are the limits the
    policy formed the step under (for tests and logs); ``predicted_time`` is the policy's
    own estimate of the step's duration, when it made one.
    """

    chunks: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    features: StepFeatures = field(default_factory=StepFeatures)
    token_budget: int | None = None
    time_budget: float | None = None
    predicted_time: float | None = None
    rejected: list[Request] = field(default_factory=list)   # refused before this step (late=reject)

    @property
    def num_tokens(self) -> int:
        return self.features.new_tokens

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def add(self, req: Request, k: int) -> None:
        self.chunks.append((req, k))
        self.features.add(req.num_computed, k)

    def remove(self, req: Request) -> int:
        """Take ``req``'s chunk back out of the step (a policy preempted it after placing
        it); returns its token count, 0 if it had none here."""
        for t, (r, k) in enumerate(self.chunks):
            if r is req:
                del self.chunks[t]
                f = self.features
                c = req.num_computed
                f.num_seqs -= 1
                f.new_tokens -= k
                f.context_tokens -= c + k
                f.attention_pairs -= attention_pairs(c, k)
                return k
        return 0


@dataclass(slots=True)
class StepResult:
    """What the executor reports after running a plan.

    ``duration``: seconds the step took (measured by the engine, predicted by the
    simulator). ``token_ids``: the token sampled for each request that reached the end of
    its known tokens (engine only; the simulator samples nothing). ``stopped``: requests
    that hit EOS or a stop condition with that token (engine only). ``logprobs``: for the
    requests that asked, the sampled token's logprob entries; ``prompt_logprobs``: for the
    requests that asked, ``(first prompt position, entries per position)`` of the prompt
    tokens this step scored (engine only; None when nobody asked).
    """

    duration: float
    token_ids: dict[str, int] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: dict[str, Any] | None = None
