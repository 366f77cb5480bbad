"""An OpenAI/vLLM request body -> the engine's ``SamplingParams``, as vLLM's server maps
it (``to_sampling_params``): the same defaults, ``logit_bias`` keys parsed as token ids
and values clamped to [-100, 100], chat's ``logprobs``/``top_logprobs`` pair to one
count, completions' ``echo`` with ``logprobs`` scoring the prompt too. A value the
engine would refuse raises ``ValueError`` (the app answers 400)."""

from __future__ import annotations

from typing import Any

from fairbatch.engine.params import SamplingParams

LOGIT_BIAS_LIMIT = 100.0


def logprobs_count(body: Any) -> int | None:
    """How many top alternatives to report per sampled token, or None for no logprobs."""
    lp = getattr(body, "logprobs", None)
    if isinstance(lp, bool):           # chat: logprobs true + top_logprobs k
        return (getattr(body, "top_logprobs", None) or 0) if lp else None
    return lp                          # completions: logprobs k


def prompt_logprobs_count(body: Any) -> int | None:
    """``prompt_logprobs``, or with ``echo`` and none given, ``logprobs`` (vLLM's rule:
    echoed prompt tokens carry logprobs too)."""
    k = body.prompt_logprobs
    lp = body.logprobs
    if k is None and getattr(body, "echo", False) is True and isinstance(lp, int) and not isinstance(lp, bool):
        k = lp
    return k


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tok = int(key)
        except ValueError:
            raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
        if not 0 <= tok < vocab_size:
            raise ValueError(f"logit_bias: token id {tok} is outside the vocabulary (0..{vocab_size - 1})")
        out[tok] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
    return out


def sampling_params(body: Any, max_tokens: int, vocab_size: int) -> SamplingParams:
    sp = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        allowed_token_ids=list(body.allowed_token_ids) if body.allowed_token_ids is not None else None,
        logit_bias=parse_logit_bias(body.logit_bias, vocab_size),
        logprobs=logprobs_count(body),
        prompt_logprobs=prompt_logprobs_count(body))
    sp.check_vocab(vocab_size)
    return sp
