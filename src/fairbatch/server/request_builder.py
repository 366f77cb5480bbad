"""A validated request body -> the engine's requests, one per prompt x ``n``.

Every check a client can fail happens here, before anything reaches the engine: fields
fairbatch cannot honour, too many choices, token ids outside the vocabulary, a prompt
too long for the context, a bad SLO or sampling parameter. Each failure is a 400 in
OpenAI's format naming the field (``errors.bad_request``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fairbatch.engine.params import SamplingParams
from fairbatch.request import SLO
from fairbatch.server.errors import bad_request
from fairbatch.server.model import ServedModel
from fairbatch.server.protocol import SLOField, _Sampling
from fairbatch.server.sampling import sampling_params


def request_slo(model: ServedModel, field: SLOField | None) -> SLO:
    d = model.default_slo
    if field is None:
        return d
    ttft = field.ttft_ms / 1000.0 if field.ttft_ms is not None else d.ttft
    tpot = field.tpot_ms / 1000.0 if field.tpot_ms is not None else d.tpot
    name = field.slo_class or ("custom" if (field.ttft_ms or field.tpot_ms) else d.name)
    try:            # the schema bounds the milliseconds; this checks the seconds the scheduler gets
        return SLO(ttft, tpot, name)
    except ValueError as e:
        raise bad_request(str(e), "slo") from None


def sampling(model: ServedModel, body: _Sampling, max_tokens: int) -> SamplingParams:
    try:
        return sampling_params(body, max_tokens, model.vocab_size)
    except ValueError as e:
        raise bad_request(str(e)) from None


def check_tokens(model: ServedModel, ids: Sequence[int], param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{model.vocab_size - 1})", param)


def split_prompt(model: ServedModel, prompt: Any) -> tuple[list[str | None], list[list[int]]]:
    """The four shapes of ``prompt`` -> (texts or None, token ids) per prompt."""
    if isinstance(prompt, str):
        return [prompt], [model.encode(prompt)]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if isinstance(prompt[0], int):
        return [None], [list(prompt)]
    if isinstance(prompt[0], str):
        return list(prompt), [model.encode(t) for t in prompt]
    return [None] * len(prompt), [list(p) for p in prompt]


def build_requests(model: ServedModel, body: _Sampling, prompts: list[list[int]], *, limit: int | None,
                   default_limit: int | None, max_choices: int, arrival: float, prefix: str) -> list[Any]:
    """The engine's requests for ``prompts`` x ``body.n``, ids ``{prefix}-{k}``. ``limit``:
    the output limit the client asked for; else ``default_limit``, cut to the context left."""
    if msg := body.unsupported():
        raise bad_request(msg)
    if len(prompts) * body.n > max_choices:
        raise bad_request(f"{len(prompts)} prompts x n={body.n} exceeds {max_choices} choices per request", "n")
    if body.stop_token_ids:
        check_tokens(model, body.stop_token_ids, "stop_token_ids")
    slo = request_slo(model, body.slo)
    lengths = []
    for ids in prompts:       # every length first: cheap, and bounds the vocabulary scan below
        try:
            if limit is not None:
                lengths.append(model.check_length(len(ids), limit))
            else:             # a default never fails a request: at most the context left (vLLM's rule)
                room = model.check_length(len(ids), None)
                lengths.append(room if default_limit is None else min(default_limit, room))
        except ValueError as e:
            raise bad_request(str(e), "max_tokens" if ids and limit else "prompt") from None
    reqs = []
    for p, (ids, max_tokens) in enumerate(zip(prompts, lengths)):
        check_tokens(model, ids, "prompt")
        sp = sampling(model, body, max_tokens)
        for j in range(body.n):
            try:
                reqs.append(model.make_request(f"{prefix}-{p * body.n + j}", ids, sp, slo=slo,
                                               priority=body.priority, arrival=arrival,
                                               like=reqs[-1] if j else None))
            except ValueError as e:
                raise bad_request(str(e), "prompt") from None
    return reqs
