"""``POST /v1/completions``: prompts (text or token ids, one or several) -> completions,
whole or streamed, with vLLM's ``echo``, logprobs and prompt logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fairbatch.server.async_engine import clock
from fairbatch.server.choice_stream import choice_outputs, collect, procs_of, usage
from fairbatch.server.errors import bad_request
from fairbatch.server.logprobs import completion_logprobs, prompt_logprobs_json
from fairbatch.server.output import OutputProcessor
from fairbatch.server.protocol import CompletionRequest
from fairbatch.server.request_builder import build_requests, split_prompt
from fairbatch.server.sampling import logprobs_count, prompt_logprobs_count
from fairbatch.server.serving import Serving, off_loop_if_heavy
from fairbatch.server.sse_stream import SSEResponse, first_output, stream_events

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions


async def create_completion(s: Serving, body: CompletionRequest, raw: Request) -> Response:
    arrival = clock()
    model = s.model
    s.check_model(body.model)
    rid = f"cmpl-{uuid.uuid4().hex}"

    def prepare() -> tuple[list[list[int]], list[Any], list[str | None]]:
        try:
            texts, prompts = split_prompt(model, body.prompt)
        except ValueError as e:
            raise bad_request(str(e), "prompt") from None
        reqs = build_requests(model, body, prompts, limit=body.max_tokens, default_limit=DEFAULT_COMPLETION_MAX_TOKENS,
                              max_choices=s.max_choices, arrival=arrival, prefix=rid)
        echo: list[str | None] = [None] * len(reqs)
        if body.echo:
            echo = [texts[i // body.n] if texts[i // body.n] is not None
                    else model.decode(prompts[i // body.n]) for i in range(len(reqs))]
        return prompts, reqs, echo

    prompts, reqs, echo = await off_loop_if_heavy(raw, prepare)
    group = s.submit(reqs)
    usage_prompt = sum(len(p) for p in prompts)
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model.name}
    k = logprobs_count(body)
    prompt_k = prompt_logprobs_count(body)
    offsets = [0] * len(reqs)          # text_offset of each choice's next logprob token

    def choice(i: int, text: str, reason: str | None, proc: OutputProcessor, first: bool) -> dict[str, Any]:
        """One choice's chunk (or whole answer); ``first``: its first, which carries the
        echoed prompt (and the prompt's logprobs), as vLLM sends it with the first token."""
        entries = proc.take_logprobs() if k is not None else []
        if first and body.echo:
            text = (echo[i] or "") + text
            if k is not None:
                entries = list((proc.prompt_logprobs or [None])) + entries
        logprobs = None
        if k is not None:
            logprobs = completion_logprobs(entries, k, model.decode, offsets[i])
            offsets[i] += sum(len(t) for t in logprobs["tokens"])
        out = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason,
               "stop_reason": proc.stop_reason if reason is not None else None}
        if first and prompt_k is not None:      # asked for, or echo with logprobs (as vLLM)
            out["prompt_logprobs"] = prompt_logprobs_json(proc.prompt_logprobs, model.decode)
        return out

    if body.stream:
        outputs = await first_output(choice_outputs(group, model, body, s.retry_after), group, raw)
        return SSEResponse(stream_events(outputs, group, base, usage_prompt, body.stream_options, choice), group)

    results = await collect(group, model, body, raw, s.retry_after)
    procs = procs_of(group)
    choices = [choice(i, text, reason, procs[i], True) for i, (text, reason) in enumerate(results)]
    return JSONResponse({**base, "choices": choices, "usage": usage(usage_prompt, procs_of(group))})
