"""The step-time model interface shared by schedulers and the simulator."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fairbatch.plan import StepFeatures


class LatencyModel(ABC):
    """Predicts the duration in seconds of one forward pass from its StepFeatures."""

    kind: str = "abstract"

    @abstractmethod
    def predict(self, f: StepFeatures) -> float: ...

    def max_chunk(self, base: StepFeatures, cached: int, limit: int, budget: float) -> int:
        """Largest ``k`` in ``[0, limit]`` such that adding a chunk of ``k`` tokens (of a
        request with ``cached`` tokens in the KV cache) to ``base`` keeps the predicted step
        time within ``budget``. Generic version: bisection, assuming time grows with ``k``.
        Models with a closed form override it."""
        if limit <= 0 or self.predict(base.with_chunk(cached, 1)) > budget:
            return 0
        if self.predict(base.with_chunk(cached, limit)) <= budget:
            return limit
        lo, hi = 1, limit  # predict(lo) fits, predict(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predict(base.with_chunk(cached, mid)) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def max_decodes(self, base: StepFeatures, contexts: list[int], budget: float) -> int:
        """Largest ``j`` such that adding decodes (one token each) over the first ``j``
        ``contexts`` to ``base`` keeps the predicted step within ``budget``: bisection over
        prefix sums, O(log n) predictions, assuming time grows with every decode added."""
        prefix = [0]
        acc = 0
        for c in contexts:
            acc += c
            prefix.append(acc)
        predict = self.predict
        s0, n0, c0, p0 = base.num_seqs, base.new_tokens, base.context_tokens, base.attention_pairs

        def fits(j: int) -> bool:
            c = prefix[j] + j
            return predict(StepFeatures(s0 + j, n0 + j, c0 + c, p0 + c)) <= budget

        m = len(contexts)
        if fits(m):
            return m
        lo, hi = 0, m      # fits(lo) holds (adding nothing adds no time), fits(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def max_tokens_in(self, budget: float, context: int = 0) -> int:
        """Largest single-chunk step (``k`` new tokens over ``context`` cached tokens) that
        fits ``budget``: a convenience for token-budget recipes such as Sarathi-Serve's."""
        return self.max_chunk(StepFeatures(), context, 1 << 20, budget)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...
