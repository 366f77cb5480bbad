"""vLLM's utility endpoints, shaped as vLLM's server answers them, so tools written
against vLLM (evaluation harnesses that count tokens, load balancers that probe
``/ping``) work unchanged:

- ``POST /tokenize``: ``{"prompt": ...}`` or ``{"messages": [...]}`` (the chat template
  applied, as ``/v1/chat/completions`` would) -> ``{"count", "max_model_len", "tokens",
  "token_strs"}``;
- ``POST /detokenize``: ``{"tokens": [...]}`` -> ``{"prompt": text}``;
- ``GET /version`` -> ``{"version": ...}`` (ours: fairbatch's version);
- ``GET|POST /ping``: an empty 200 while the engine runs, 503 otherwise (vLLM's
  ``/health`` answer; ours keeps its JSON body).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StrictBool, StrictStr

from fairbatch.server.errors import APIError, bad_request, error_response
from fairbatch.server.protocol import MAX_MESSAGES, ChatMessage, TokenId, _Body


class TokenizeCompletionRequest(_Body):
    model: Optional[StrictStr] = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: Optional[StrictBool] = False


class TokenizeChatRequest(_Body):
    model: Optional[StrictStr] = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: StrictBool = True
    return_token_strs: Optional[StrictBool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None


class DetokenizeRequest(_Body):
    model: Optional[StrictStr] = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


def token_strs(model: Any, ids: list[int]) -> list[str]:
    """Each id's vocabulary string (``tokenizers``' ``id_to_token``, as vLLM's
    ``convert_ids_to_tokens``); the byte tokenizer has none, so its decoded text."""
    raw = getattr(model.tokenizer, "_tok", None)
    if raw is not None:
        return [raw.id_to_token(i) or "" for i in ids]
    return [model.decode([i]) for i in ids]


def add_vllm_routes(app: FastAPI, model: Any, engine: Any) -> None:
    from fairbatch import __version__

    def check_model(name: str | None) -> None:
        if name is not None and name not in model.names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")

    @app.post("/tokenize")
    async def tokenize(body: Union[TokenizeChatRequest, TokenizeCompletionRequest]) -> JSONResponse:
        check_model(body.model)
        try:
            if isinstance(body, TokenizeChatRequest):
                messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                            for m in body.messages]
                _, ids = model.chat_prompt(messages, add_generation_prompt=body.add_generation_prompt,
                                           extra=body.chat_template_kwargs)
            else:
                ids = model.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise bad_request(str(e), "messages" if isinstance(body, TokenizeChatRequest) else "prompt") from None
        return JSONResponse({"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids,
                             "token_strs": token_strs(model, ids) if body.return_token_strs else None})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{model.vocab_size - 1})", "tokens")
        return JSONResponse({"prompt": model.decode(body.tokens)})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    # one route per method: a two-method route gives both the same OpenAPI operation id
    @app.get("/ping", operation_id="ping_get")
    @app.post("/ping", operation_id="ping_post")
    async def ping() -> Response:
        if not engine.alive:
            return error_response(503, engine.error or "engine not running")
        return Response(status_code=200)
