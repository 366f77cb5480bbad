"""How far ahead of its TTFT deadline to plan a first token, from what the host measures.

A served stack delivers a token some time after the step that made it (IPC, detokenizing,
streaming a step's tokens in one burst), and that delay varies from request to request.
A policy that finishes prompts just inside their deadlines (FairBatching's EDF order and
set-aside) loses the ones whose delivery is slow; a fixed ``ttft_margin`` large enough for
a loaded server costs capacity on a quiet one (docs/ALGORITHM.md). So the host reports
each first token's delivery delay (``Scheduler.observe_delivery``) and first tokens are
planned ahead by a quantile of the recent delays.
"""

from __future__ import annotations

from collections import deque

_WINDOW = 1024    # recent delays kept
_REFRESH = 64     # the quantile is recomputed after this many new delays


class DeliveryLead:
    __slots__ = ("quantile", "_delays", "_since", "lead")

    def __init__(self, quantile: float) -> None:
        self.quantile = quantile
        self._delays: deque[float] = deque(maxlen=_WINDOW)
        self._since = 0
        self.lead = 0.0           # seconds: the quantile of the delays seen so far

    def observe(self, delay: float) -> None:
        if not delay >= 0.0:      # (a clock step or a NaN from a host: ignore it)
            return
        self._delays.append(delay)
        self._since += 1
        # refresh often while the window fills, then every _REFRESH delays
        if self._since >= _REFRESH or len(self._delays) < _REFRESH:
            self._since = 0
            ordered = sorted(self._delays)
            self.lead = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
