"""Per-request logits processing on a batch, as vLLM V1 defines each parameter.

Every function takes the ``[n, V]`` float32 logits of ``n`` requests and per-row
parameters, and returns new logits (the caller's tensor is never changed: the raw
logits are still needed for logprobs). A row whose parameter is off (``None``, 0, 1.0)
comes out unchanged, so one batched call serves a mixed batch.

The order is vLLM's (``vllm/v1/sample/sampler.py``): allowed token ids, min_tokens,
logit bias, penalties; then greedy rows take the argmax, random rows go on through
temperature and min_p (``Sampler``), then top-k / top-p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values on ``device`` without waiting for the work queued there: a plain
    ``torch.tensor(..., device=cuda)`` copies synchronously, which would make a step
    launched one step ahead (step_ahead.py) wait for the step before it."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def allowed_only(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """Rows with an allow-list keep only those tokens (the rest to -inf)."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for i, ids in enumerate(allowed):
        if ids is None:
            continue
        mask[i] = True
        mask[i, to_device(list(ids), torch.long, logits.device)] = False
    return logits.masked_fill(mask, NEG_INF)


def block_tokens(logits: torch.Tensor, blocked: Sequence[Sequence[int]]) -> torch.Tensor:
    """-inf for each row's listed tokens: min_tokens makes EOS and stop tokens impossible
    until the request has that many output tokens."""
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(blocked):
        rows.extend([i] * len(ids))
        cols.extend(ids)
    if not rows:
        return logits
    out = logits.clone()
    dev = logits.device
    out[to_device(rows, torch.long, dev), to_device(cols, torch.long, dev)] = NEG_INF
    return out


def add_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's ``{token id: bias}`` added to its logits."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, b in enumerate(biases):
        for tok, v in (b or {}).items():
            rows.append(i)
            cols.append(tok)
            vals.append(v)
    if not rows:
        return logits
    dev = logits.device
    out = logits.clone()
    out.index_put_((to_device(rows, torch.long, dev), to_device(cols, torch.long, dev)),
                   to_device(vals, logits.dtype, dev), accumulate=True)
    return out


def token_counts(ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[n, V]`` counts of each token id in each row's list."""
    counts = torch.zeros(len(ids), vocab + 1, dtype=torch.float32, device=device)
    width = max((len(x) for x in ids), default=0)
    if width:
        # padded with ``vocab`` (one spare column, dropped), as vLLM pads its token tensors
        padded = torch.full((len(ids), width), vocab, dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                padded[i, :len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        padded = to_device(padded, torch.long, device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                    repetition: Sequence[float], frequency: Sequence[float], presence: Sequence[float]
                    ) -> torch.Tensor:
    """vLLM's penalties (``apply_penalties``):

    - repetition (CTRL's): a token seen in the prompt or the output has its logit divided
      by the penalty when positive, multiplied by it when not;
    - frequency: ``logit -= penalty * (times the token is in the output)``;
    - presence: ``logit -= penalty * (1 if the token is in the output)``.
    """
    n, V = logits.shape
    dev = logits.device
    out_counts = token_counts(output_ids, V, dev)
    seen_out = out_counts > 0
    out = logits.clone()
    rep = to_device(repetition, logits.dtype, dev)[:, None]
    if any(r != 1.0 for r in repetition):
        seen = seen_out | (token_counts(prompt_ids, V, dev) > 0)
        penalised = torch.where(out > 0, out / rep, out * rep)
        out = torch.where(seen, penalised, out)
    freq = to_device(frequency, logits.dtype, dev)[:, None]
    pres = to_device(presence, logits.dtype, dev)[:, None]
    return out - freq * out_counts - pres * seen_out.to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """min_p: drop tokens whose probability is below ``min_p`` times the top token's
    (after temperature, as vLLM applies it)."""
    mp = to_device(min_p, logits.dtype, logits.device)[:, None]
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * mp
    return logits.masked_fill(probs < threshold, NEG_INF)


# --- logprobs -------------------------------------------------------------------------------
# One entry per token: (token id, logprob, rank), rank 1 = the most likely token. The
# chosen token comes first, then the top ``k`` (vLLM's layout: the chosen token may also
# appear among them).
Entry = tuple[int, float, int]


def logprob_entries(logprobs: torch.Tensor, chosen: Sequence[int], ks: Sequence[int]) -> list[list[Entry]]:
    """For row ``i`` of ``[n, V]`` log-probabilities: the chosen token's entry, then the
    top ``ks[i]`` tokens'."""
    if not len(chosen):
        return []
    dev = logprobs.device
    idx = torch.tensor(list(chosen), dtype=torch.long, device=dev)
    chosen_lp = logprobs.gather(1, idx[:, None])
    # rank as vLLM counts it: 1 + tokens strictly more likely than the chosen one
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
    kmax = max(ks)
    top_lp, top_ids = logprobs.topk(kmax, dim=-1) if kmax else (None, None)
    chosen_lp_l = chosen_lp.squeeze(1).tolist()
    ranks_l = ranks.tolist()
    top_lp_l = top_lp.tolist() if top_lp is not None else None
    top_ids_l = top_ids.tolist() if top_ids is not None else None
    out: list[list[Entry]] = []
    for i, tok in enumerate(chosen):
        row: list[Entry] = [(int(tok), float(chosen_lp_l[i]), int(ranks_l[i]))]
        for r in range(ks[i]):
            row.append((int(top_ids_l[i][r]), float(top_lp_l[i][r]), r + 1))
        out.append(row)
    return out
