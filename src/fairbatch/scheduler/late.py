"""What a scheduler does with a request that can no longer meet its SLO: one mechanism,
shared by every policy, so that no policy wins by handling late requests better than
the others are allowed to.

``late`` (``SchedulerConfig.late``):

- ``serve``: nothing special; every request is served in the policy's own order.
- ``relegate``: a prompt that cannot meet its first-token deadline, and the decodes of a
  request whose first token came late, go behind every request that can still meet its
  SLO. They still complete: relegated prompts run when nothing on time is waiting, and
  relegated decodes get a token at least every ``failed_decode_gap`` TPOTs.
- ``reject``: as ``relegate``, except that a prompt that cannot meet its first-token
  deadline, at arrival or while queued or part-way through its prefill, is refused at
  once and its KV freed. A request whose tokens are already streaming is never refused.

The feasibility test is the same for every policy: a prompt is late once its deadline
falls before ``now + prefill_floor``, the time the latency model gives its remaining
prefill in a step of its own. That is a lower bound on when it can finish, so no
request that could still make its deadline is given up on.
"""

from __future__ import annotations

from enum import Enum

from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepFeatures
from fairbatch.request import Request


class Late(str, Enum):
    SERVE = "serve"
    RELEGATE = "relegate"
    REJECT = "reject"

    @classmethod
    def parse(cls, value: "str | Late") -> "Late":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"late must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None


def prefill_floor(latency: LatencyModel, req: Request) -> float:
    """Lower bound on the time to finish ``req``'s prompt: one step computing all of its
    remaining prompt tokens and nothing else."""
    c = req.num_computed
    k = req.prompt_len - c
    if k <= 0:
        return 0.0
    return latency.predict(StepFeatures().with_chunk(c, k))


def latest_start(latency: LatencyModel, req: Request) -> float:
    """The last moment at which ``req``'s remaining prefill can start and still finish by
    its first-token deadline (``-inf`` once it has a first token: nothing left to miss)."""
    if req.generated:
        return float("-inf")
    return req.deadline - prefill_floor(latency, req)


def last_token_time(req: Request) -> float:
    """Order of relegated decodes: the one that waited longest for a token first."""
    return req.token_times[-1]
