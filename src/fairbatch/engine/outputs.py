"""vLLM's output classes for the offline ``LLM``: ``RequestOutput.outputs`` is a list of
``CompletionOutput`` (one per sample, ``SamplingParams.n``), whose ``logprobs`` are, per
token, ``{token id: Logprob(logprob, rank, decoded_token)}`` with the chosen token first,
so code written against vLLM's ``LLM.generate`` reads ours unchanged
(``out.outputs[0].text``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


def logprob_dicts(entries: Sequence[Sequence[tuple[int, float, int]] | None] | None,
                  decode: Callable[[list[int]], str]) -> list[dict[int, Logprob] | None] | None:
    """The engine's ``[(token id, logprob, rank), ...]`` per token -> vLLM's dicts (a token
    listed twice, chosen and among the top k, keeps its first place)."""
    if entries is None:
        return None
    out: list[dict[int, Logprob] | None] = []
    for row in entries:
        if row is None:
            out.append(None)
            continue
        d: dict[int, Logprob] = {}
        for tok, lp, rank in row:
            d.setdefault(tok, Logprob(lp, rank, decode([tok])))
        out.append(d)
    return out
