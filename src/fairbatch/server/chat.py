"""``POST /v1/chat/completions``: messages through the model's chat template -> one or
``n`` assistant messages, whole or streamed (a choice's role delta goes out with its
first token)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fairbatch.server.async_engine import clock
from fairbatch.server.choice_stream import choice_outputs, collect, procs_of, usage
from fairbatch.server.errors import bad_request
from fairbatch.server.logprobs import chat_logprobs, prompt_logprobs_json
from fairbatch.server.output import OutputProcessor
from fairbatch.server.protocol import ChatCompletionRequest
from fairbatch.server.request_builder import build_requests
from fairbatch.server.sampling import logprobs_count
from fairbatch.server.serving import Serving, off_loop_if_heavy
from fairbatch.server.sse_stream import SSEResponse, first_output, stream_events


def _role_delta(i: int) -> dict[str, Any]:
    return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


async def create_chat_completion(s: Serving, body: ChatCompletionRequest, raw: Request) -> Response:
    arrival = clock()
    model = s.model
    s.check_model(body.model)
    if msg := body.unsupported():
        raise bad_request(msg)
    rid = f"chatcmpl-{uuid.uuid4().hex}"

    def prepare() -> tuple[list[int], list[Any]]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            _, ids = model.chat_prompt(messages, add_generation_prompt=body.add_generation_prompt,
                                       extra=body.chat_template_kwargs)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        return ids, build_requests(model, body, [ids], limit=body.token_limit, default_limit=s.default_max_tokens,
                                   max_choices=s.max_choices, arrival=arrival, prefix=rid)

    ids, reqs = await off_loop_if_heavy(raw, prepare)
    group = s.submit(reqs)
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model.name}
    k = logprobs_count(body)

    def chat_lp(proc: OutputProcessor) -> dict[str, Any] | None:
        return chat_logprobs(proc.take_logprobs(), k, model.decode) if k is not None else None

    def delta_chunk(i: int, text: str, reason: str | None, proc: OutputProcessor, first: bool) -> dict[str, Any]:
        delta = {"content": text} if (text or reason is None) else {}
        out = {"index": i, "delta": delta, "logprobs": chat_lp(proc), "finish_reason": reason}
        if reason is not None:
            out["stop_reason"] = proc.stop_reason
        return out

    if body.stream:
        outputs = await first_output(choice_outputs(group, model, body, s.retry_after), group, raw)
        return SSEResponse(stream_events(outputs, group, base, len(ids), body.stream_options, delta_chunk,
                                         opening=_role_delta), group)

    results = await collect(group, model, body, raw, s.retry_after)
    procs = procs_of(group)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": base["created"], "model": model.name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                     "logprobs": chat_lp(procs[i]), "finish_reason": reason, "stop_reason": procs[i].stop_reason}
                    for i, (text, reason) in enumerate(results)],
        "usage": usage(len(ids), procs),
        "prompt_logprobs": prompt_logprobs_json(procs[0].prompt_logprobs, model.decode)
        if body.prompt_logprobs is not None else None})
