"""Batched sampling: vLLM's logits processing (``logits_ops``), then greedy, or temperature,
min-p, top-k, top-p and a per-request seed.

Random rows draw ``argmax(probs / E)`` with ``E ~ Exponential(1)`` per vocabulary entry,
which samples exactly from ``probs`` without a CDF search. A seeded request's noise comes
from a generator seeded by ``(seed, index of the token being sampled)``: its output does
not depend on its batch-mates, and a preemption (which replays the same tokens) cannot
shift its random stream.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from fairbatch.engine.logits_ops import add_bias, allowed_only, apply_min_p, apply_penalties, block_tokens, to_device
from fairbatch.engine.params import SamplingParams
from fairbatch.request import Request

_GREEDY = SamplingParams(temperature=0.0)


def params_of(req: Request) -> SamplingParams:
    s = req.sampling
    return s if isinstance(s, SamplingParams) else _GREEDY


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, reqs: list[Request],
               stop_sets: Sequence[Collection[int]] | None = None) -> list[int]:
        """``logits``: [n, V] float32 rows, one per request in ``reqs`` (not modified).
        ``stop_sets``: each request's EOS and stop token ids, which ``min_tokens`` holds
        back while the request has fewer output tokens."""
        if not reqs:
            return []
        return self.sample_tensor(logits, reqs, stop_sets).tolist()

    def sample_tensor(self, logits: torch.Tensor, reqs: list[Request],
                      stop_sets: Sequence[Collection[int]] | None = None) -> torch.Tensor:
        """``sample`` without waiting for the device: the tokens as a tensor on it."""
        params = [params_of(r) for r in reqs]
        greedy = [p.greedy for p in params]
        if not all(p.plain for p in params) and any(p.edits_logits for p in params):
            logits = process(logits, reqs, params, stop_sets)
        if all(greedy):
            return logits.argmax(dim=-1)
        V = logits.shape[1]
        dev = logits.device
        temps = to_device([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, dev)
        scaled = logits / temps[:, None]
        if not all(p.plain for p in params) and any(p.min_p > 0 and not g for p, g in zip(params, greedy)):
            scaled = apply_min_p(scaled, [0.0 if g else p.min_p for p, g in zip(params, greedy)])
        ks = [p.top_k if p.top_k > 0 and not g else V for p, g in zip(params, greedy)]
        tops = [p.top_p if not g else 1.0 for p, g in zip(params, greedy)]
        if min(ks) == V and min(tops) == 1.0:
            # nothing truncates the distribution: race the tokens themselves, no sort of the
            # vocabulary (128k entries a row for Llama 3: the costliest part otherwise)
            tokens = self._race(torch.softmax(scaled, dim=-1), reqs, params, greedy)
            return self._keep_greedy(tokens, logits, greedy)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        if min(ks) < V:
            k_t = to_device(ks, torch.int64, dev)
            rank = torch.arange(V, device=dev)
            sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k_t[:, None], float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        if min(tops) < 1.0:
            p_t = to_device(tops, torch.float32, dev)
            before = probs.cumsum(dim=-1) - probs       # mass strictly ahead of each entry
            probs = probs.masked_fill(before >= p_t[:, None], 0.0)   # the top entry always stays
        pick = self._race(probs, reqs, params, greedy, order)
        tokens = order.gather(1, pick[:, None]).squeeze(1)
        return self._keep_greedy(tokens, logits, greedy)

    def _race(self, probs: torch.Tensor, reqs: list[Request], params: list, greedy: list[bool],
              order: torch.Tensor | None = None) -> torch.Tensor:
        """One draw per row, argmax(p / Exp(1)): the column index into ``probs``, whose
        columns are the vocabulary, or its entries sorted by ``order``. The noise is drawn
        per vocabulary entry either way, so a row picks the same token whether or not its
        batch-mates made the step sort (a seeded request stays batch-independent). A seeded
        row draws from a generator of its own, keyed by (seed, token index)."""
        dev = probs.device
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for i, p in enumerate(params):
            if p.seed is not None and not greedy[i]:
                g = torch.Generator(device=dev).manual_seed(_mix(p.seed, reqs[i].generated))
                noise[i].exponential_(generator=g)
        if order is not None:
            noise = noise.gather(1, order)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _keep_greedy(tokens: torch.Tensor, logits: torch.Tensor, greedy: list[bool]) -> torch.Tensor:
        """Greedy rows of a mixed batch take their argmax."""
        if any(greedy):
            g_rows = to_device(greedy, torch.bool, logits.device)
            tokens = torch.where(g_rows, logits.argmax(dim=-1), tokens)
        return tokens


def process(logits: torch.Tensor, reqs: Sequence[Request], params: Sequence[SamplingParams],
            stop_sets: Sequence[Collection[int]] | None) -> torch.Tensor:
    """The argmax-changing part of vLLM's logits processing, in its order: allowed token
    ids, min_tokens, logit bias, penalties (``logits_ops``)."""
    if any(p.allowed_token_ids is not None for p in params):
        logits = allowed_only(logits, [p.allowed_token_ids for p in params])
    if any(p.min_tokens for p in params):
        blocked = [sorted(stop_sets[i]) if stop_sets is not None and r.generated < p.min_tokens else []
                   for i, (r, p) in enumerate(zip(reqs, params))]
        logits = block_tokens(logits, blocked)
    if any(p.logit_bias for p in params):
        logits = add_bias(logits, [p.logit_bias for p in params])
    if any(p.has_penalties for p in params):
        logits = apply_penalties(
            logits, [(r.prompt_token_ids or []) if p.repetition_penalty != 1.0 else [] for r, p in zip(reqs, params)],
            [r.output_token_ids if p.has_penalties else [] for r, p in zip(reqs, params)],
            [p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
            [p.presence_penalty for p in params])
    return logits


def _mix(seed: int, j: int) -> int:
    # splitmix-style: distinct, well-spread generator seeds per (request seed, token index)
    x = (seed * 0x9E3779B97F4A7C15 + j * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
