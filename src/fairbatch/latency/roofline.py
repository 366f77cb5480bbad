"""Analytic step-time model: a roofline per phase of the forward pass.

``t = overhead + per_seq * num_seqs + max(linear FLOPs / F, weight bytes / B)
                                    + max(attention FLOPs / F, KV bytes / B)``

with ``F``, ``B`` the GPU's *achievable* FLOP/s and bytes/s. Why each term:

- linears (q/k/v/o, MLP, lm_head): every step streams all layer weights once whatever the
  batch (memory bound for decodes) and does ``2 * params`` FLOPs per new token (compute
  bound for prefills); lm_head runs only for rows that sample, about one per sequence.
- attention: reads every attended KV entry once (memory bound for decodes) and does
  ``4 * layers * heads * head_dim`` FLOPs per query-key pair (compute bound for long
  prefill chunks). It runs after the linears of its layer, so its time adds, not overlaps.
- ``overhead``: launches, synchronisation and host work per step that the GPU does not hide;
  ``per_seq``: per-sequence host work (input preparation, sampling, detokenisation).

Activation traffic and kernel-shape effects (tile quantisation: cuBLAS on the H100 ran a
256-token layer's linears slower than 512 tokens') are ignored; a measured LinearLatencyModel profile replaces this model
when one exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepFeatures, attention_pairs
from fairbatch.specs import GPUSpec, ModelSpec, get_gpu, get_model


@dataclass
class RooflineLatencyModel(LatencyModel):
    model: ModelSpec
    gpu: GPUSpec
    overhead_s: float = 0.6e-3
    per_seq_s: float = 5e-6

    kind = "roofline"

    # seconds per unit, precomputed: predict runs for every chunk a policy considers
    _tok: float = field(init=False, repr=False)     # linear FLOPs per new token / F
    _seq: float = field(init=False, repr=False)     # lm_head FLOPs per sequence / F
    _w: float = field(init=False, repr=False)       # weight streaming time
    _pair: float = field(init=False, repr=False)    # attention FLOPs per pair / F
    _ctx: float = field(init=False, repr=False)     # KV bytes per context token / B

    def __post_init__(self) -> None:
        if self.overhead_s < 0 or self.per_seq_s < 0:
            raise ValueError("overhead_s and per_seq_s must be non-negative")
        m, F, B = self.model, self.gpu.flops, self.gpu.bandwidth
        self._tok = m.layer_flops_per_token / F
        self._seq = m.lm_head_flops_per_token / F
        self._w = m.streamed_weight_bytes / B
        self._pair = m.attn_flops_per_pair / F
        self._ctx = m.kv_bytes_per_token / B

    def _time(self, seqs: float, new: float, ctx: float, pairs: float) -> float:
        return (self.overhead_s + self.per_seq_s * seqs
                + max(self._tok * new + self._seq * seqs, self._w)
                + max(self._pair * pairs, self._ctx * ctx))

    def predict(self, f: StepFeatures) -> float:
        return self._time(f.num_seqs, f.new_tokens, f.context_tokens, f.attention_pairs)

    def max_chunk(self, base: StepFeatures, cached: int, limit: int, budget: float) -> int:
        """Exact largest ``k``: ``max(a, b) + max(c, d) = max(a+c, a+d, b+c, b+d)``, so the
        step fits iff each of the four sums does. Each sum is ``q2 k^2 + q1 k + q0`` with
        ``q2, q1 >= 0``; take the smallest largest root, then correct float rounding
        against ``_time`` itself (a step or two at most)."""
        if limit <= 0:
            return 0
        s = base.num_seqs + 1
        n0, c0 = base.new_tokens, base.context_tokens + cached
        p0 = base.attention_pairs
        room = budget - self.overhead_s - self.per_seq_s * s
        # (q1, q0) of each max's branches as functions of k; attention pairs grow by
        # k*cached + k(k+1)/2, so its quadratic coefficient is pair/2.
        lin = (self._tok, self._tok * n0 + self._seq * s)
        wts = (0.0, self._w)
        q2 = 0.5 * self._pair
        att = (self._pair * (cached + 0.5), self._pair * p0)
        kv = (self._ctx, self._ctx * c0)
        best = float(limit)
        for a1, a0 in (lin, wts):
            for b2, b1, b0 in ((q2, *att), (0.0, *kv)):
                r = room - a0 - b0           # q2 k^2 + q1 k <= r
                q1 = a1 + b1
                if r < 0:
                    return 0
                denom = q1 + math.sqrt(q1 * q1 + 4.0 * b2 * r)   # stable root form
                if denom > 0:
                    best = min(best, 2.0 * r / denom)
        k = int(best)
        time = self._time
        while k < limit and time(s, n0 + k + 1, c0 + k + 1, p0 + attention_pairs(cached, k + 1)) <= budget:
            k += 1
        while k > 0 and time(s, n0 + k, c0 + k, p0 + attention_pairs(cached, k)) > budget:
            k -= 1
        return k

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model.to_dict(), "gpu": self.gpu.to_dict(),
                "overhead_s": self.overhead_s, "per_seq_s": self.per_seq_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RooflineLatencyModel":
        """``model`` / ``gpu`` may be full spec dicts or preset names."""
        if data.get("kind") != "roofline":
            raise ValueError(f"not a roofline latency profile (kind={data.get('kind')!r})")
        m, g = data["model"], data["gpu"]
        model = get_model(m) if isinstance(m, str) else ModelSpec(**m)
        gpu = get_gpu(g) if isinstance(g, str) else GPUSpec(**g)
        kw = {k: float(data[k]) for k in ("overhead_s", "per_seq_s") if k in data}
        return cls(model, gpu, **kw)
