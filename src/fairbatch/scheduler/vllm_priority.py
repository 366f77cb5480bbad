"""vLLM V1's ``--scheduling-policy priority`` (a baseline): vLLM's step (``vllm.py``) with
two changes, both as in vLLM's scheduler.

- **Waiting order**: by priority, lower first (``Request.priority``: the API's
  ``priority`` field; in the simulator, the rank of the request's SLO class), then in
  arrival order; a preempted request goes back ahead of the waiting ones of its priority.
- **Victim** when KV runs out while scheduling running requests: the running request with
  the largest priority number, the newest admitted among equals. It may be one already
  placed in this step (it then gives its tokens back) or the one being scheduled.

vLLM keys both on ``(priority, arrival)``. Requests reach a scheduler in arrival order, so
(with ``late=serve``) within one priority the running list is in arrival order and every
waiting request arrived after every running one: the keys above pick the same requests.
They also make every step exactly ``vllm``'s when priorities are equal, under every
``late`` mode. As in vLLM, a
higher-priority waiting prompt never preempts a running request: admission stops at the
first waiting prompt whose KV does not fit. With ``late=relegate|reject`` the shared
mechanism (``late.py``) applies: relegated prompts (``self.relegated``) wait behind every
on-time one, and the victim is the lowest-priority relegated request not yet in the step
when there is one (base ``_victim``'s rule, by priority).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from itertools import count

from fairbatch.kv import BlockAllocator
from fairbatch.latency.base import LatencyModel
from fairbatch.request import Request
from fairbatch.scheduler.base import SchedulerConfig, register_policy
from fairbatch.scheduler.late import Late
from fairbatch.scheduler.vllm import VLLMScheduler


class PriorityQueue:
    """Waiting requests by priority (lower first), with the slice of ``deque``'s
    interface the shared mechanics use: within one priority it is the FCFS deque, where
    ``append`` goes behind and ``appendleft`` (a preempted or returning request) in front."""

    __slots__ = ("_heap", "_back", "_front")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []   # (priority, position, request)
        self._back = count()
        self._front = count(-1, -1)

    def append(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, next(self._back), req))

    def appendleft(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, next(self._front), req))

    def popleft(self) -> Request:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[2]

    def __getitem__(self, i: int) -> Request:
        if i == 0 and self._heap:
            return self._heap[0][2]
        return sorted(self._heap)[i][2]

    def remove(self, req: Request) -> None:
        heap = self._heap
        for j, entry in enumerate(heap):
            if entry[2] is req:
                last = heap.pop()
                if j < len(heap):
                    heap[j] = last
                    heapq.heapify(heap)
                return
        raise ValueError(f"{req.request_id} is not waiting")

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in sorted(self._heap))


@register_policy
class VLLMPriorityScheduler(VLLMScheduler):
    name = "vllm-priority"

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, latency_model: LatencyModel) -> None:
        super().__init__(config, allocator, latency_model)
        self.waiting = PriorityQueue()   # type: ignore[assignment]

    def _victim(self, scheduled: int) -> Request:
        """The running request with the largest priority number, the newest admitted among
        equals; with ``late`` handling, relegated requests not yet in this step
        (``running[scheduled:]``) come first. Scans from the newest: only a strictly
        larger number displaces the pick."""
        running = self.running
        if self.late is not Late.SERVE:
            victim = None
            for i in range(len(running) - 1, scheduled - 1, -1):
                r = running[i]
                if r.relegated and (victim is None or r.priority > victim.priority):
                    victim = r
            if victim is not None:
                return victim
        victim = running[-1]
        worst = victim.priority
        for i in range(len(running) - 2, -1, -1):
            p = running[i].priority
            if p > worst:
                victim, worst = running[i], p
        return victim
