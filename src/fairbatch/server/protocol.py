"""Pydantic models of the OpenAI request bodies the server accepts.

Field names, types and defaults follow the OpenAI API (and vLLM's extensions where
OpenAI has none: ``ignore_eos``, ``top_k``, ``stop_token_ids``, ``priority``); ``slo`` is
ours. Unknown fields are accepted and ignored, as vLLM does, so clients that send other
servers' extensions still work. Numbers are bounded and must be finite: a value the
engine cannot use is a 400 here, never an error deep in a step.

Responses are built as plain dicts in ``app.py`` (they only ever leave as JSON).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

I64_MAX = 2**63 - 1
MAX_CHOICES = 256          # prompts x n in one request
MAX_STOP = 16              # stop strings
MAX_STOP_IDS = 1024        # stop token ids


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


TokenId = Annotated[StrictInt, Field(ge=0, le=I64_MAX)]


class SLOField(_Body):
    """Per-request latency objectives (milliseconds), overriding the server's defaults.
    ``class`` names the SLO class the request is counted under in /metrics."""

    ttft_ms: Optional[float] = Field(default=None, gt=0, le=1e9)
    tpot_ms: Optional[float] = Field(default=None, gt=0, le=1e9)
    slo_class: Optional[StrictStr] = Field(default=None, alias="class", max_length=64)


class StreamOptions(_Body):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class _Sampling(_Body):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1, le=I64_MAX)
    temperature: Optional[float] = Field(default=None, ge=0, le=1e6)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(default=None, ge=-1, le=I64_MAX)
    seed: Optional[StrictInt] = Field(default=None, ge=-I64_MAX, le=I64_MAX)
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stop_token_ids: Optional[list[TokenId]] = Field(default=None, max_length=MAX_STOP_IDS)
    ignore_eos: bool = False
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    priority: StrictInt = Field(default=0, ge=-(2**31), le=2**31 - 1)
    slo: Optional[SLOField] = None
    user: Optional[StrictStr] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    best_of: Optional[StrictInt] = Field(default=None, ge=1, le=MAX_CHOICES)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in items if s]

    def unsupported(self) -> str | None:
        """The first requested feature this server does not implement, if any."""
        if self.presence_penalty:
            return "presence_penalty is not supported"
        if self.frequency_penalty:
            return "frequency_penalty is not supported"
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of other than n is not supported"
        return None


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a text, a list of texts, a list of token ids, or
    a list of token-id lists (one choice per prompt, times ``n``)."""

    prompt: Union[StrictStr, list[TokenId], list[StrictStr], list[list[TokenId]]]
    echo: bool = False
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    suffix: Optional[StrictStr] = None

    def unsupported(self) -> str | None:
        if self.logprobs is not None:
            return "logprobs are not supported"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr = Field(max_length=64)
    content: Optional[Union[StrictStr, list[TextPart]]] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1, le=I64_MAX)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs are not supported"
        if self.tools:
            return "tools are not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported"
        return super().unsupported()

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
