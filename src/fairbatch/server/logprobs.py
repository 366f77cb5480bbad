"""Logprob entries -> the JSON shapes OpenAI's API (and vLLM's server) return.

The engine reports, per token, ``[(token id, logprob, rank), ...]``: the token itself
first, then the top ``k``. vLLM keeps them in a dict keyed by token id (so a chosen
token that is also among the top k appears once, in first place), and each endpoint
cuts that dict its own way:

- completions: ``{"tokens", "token_logprobs", "text_offset", "top_logprobs"}``, where
  ``top_logprobs`` maps token text to logprob over the first ``k + 1`` dict entries;
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, with
  the first ``k`` dict entries in ``top_logprobs``;
- ``prompt_logprobs`` (vLLM's extension): per prompt position ``None`` (position 0) or
  ``{token id: {"logprob", "rank", "decoded_token"}}``.

``-inf`` cannot be JSON: logprobs are floored at -9999.0, as vLLM and OpenAI do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

FLOOR = -9999.0

Decode = Callable[[Sequence[int]], str]


def _as_dict(entries: Sequence[tuple[int, float, int]]) -> dict[int, tuple[float, int]]:
    out: dict[int, tuple[float, int]] = {}
    for tok, lp, rank in entries:
        out[tok] = (lp, rank)      # a repeat keeps its first place, as in a dict update
    return out


def _lp(x: float) -> float:
    return max(x, FLOOR)


def completion_logprobs(token_entries: Sequence[Sequence[tuple[int, float, int]] | None], k: int,
                        decode: Decode, offset: int = 0) -> dict[str, Any]:
    """``token_entries``: per token (prompt tokens first when echoed), its entries or None
    (the first prompt token, which nothing scores)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    for entries in token_entries:
        offsets.append(offset)
        if entries is None:
            tokens.append("")
            token_lps.append(None)
            tops.append(None)
            continue
        tok, lp, _ = entries[0]
        text = decode([tok])
        tokens.append(text)
        token_lps.append(_lp(lp))
        d = _as_dict(entries)
        tops.append({decode([t]): _lp(v[0]) for i, (t, v) in enumerate(d.items()) if i <= k})
        offset += len(text)
    return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(token_entries: Sequence[Sequence[tuple[int, float, int]]], k: int, decode: Decode
                  ) -> dict[str, Any]:
    content = []
    for entries in token_entries:
        tok, lp, _ = entries[0]
        text = decode([tok])
        d = _as_dict(entries)
        top = []
        for i, (t, (v, _)) in enumerate(d.items()):
            if i >= k:
                break
            s = decode([t])
            top.append({"token": s, "logprob": _lp(v), "bytes": list(s.encode("utf-8", errors="replace"))})
        content.append({"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8", errors="replace")),
                        "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(positions: Sequence[Sequence[tuple[int, float, int]] | None] | None, decode: Decode
                         ) -> list[dict[str, dict[str, Any]] | None] | None:
    if positions is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for entries in positions:
        if entries is None:
            out.append(None)
            continue
        out.append({str(t): {"logprob": _lp(lp), "rank": rank, "decoded_token": decode([t])}
                    for t, (lp, rank) in _as_dict(entries).items()})
    return out
