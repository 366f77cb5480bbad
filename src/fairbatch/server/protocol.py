"""Pydantic models of the OpenAI request bodies the server accepts.

Field names, types and defaults follow the OpenAI API (and vLLM's extensions where
OpenAI has none: ``ignore_eos``, ``top_k``, ``min_p``, ``min_tokens``,
``repetition_penalty``, ``allowed_token_ids``, ``stop_token_ids``, ``prompt_logprobs``,
``include_stop_str_in_output``, ``priority``); ``slo`` is ours. Fields this server knows
and does not implement are refused (``unsupported.py``); unknown ones are accepted and
ignored, as vLLM does, so clients that send other servers' extensions still work. Numbers are bounded and must be finite: a value the
engine cannot use is a 400 here, never an error deep in a step.

Responses are built as plain dicts in ``app.py`` (they only ever leave as JSON).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from fairbatch.server.unsupported import CHAT, COMMON, COMPLETIONS, refused_field

I64_MAX = 2**63 - 1
MAX_CHOICES = 256          # prompts x n in one request
MAX_STOP = 16              # stop strings
MAX_STOP_IDS = 1024        # stop token ids
# List bounds, checked while the body is validated: an abusive list is refused before the
# server walks it. The context bounds a prompt much more tightly (checked next, before the
# vocabulary scan); these only cap what any context could hold.
MAX_PROMPT_IDS = 1 << 20   # token ids in one prompt
MAX_MESSAGES = 4096        # chat messages
MAX_PARTS = 1024           # text parts of one message
# A per-request SLO below this (milliseconds) is a typo or an attack, not an objective: one
# microsecond. Checked on the value the scheduler gets (seconds), after the conversion, so
# a denormal like 1e-321 that passes ``> 0`` but becomes 0.0 is a 400, not a 500.
MIN_SLO_MS = 1e-3


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


TokenId = Annotated[StrictInt, Field(ge=0, le=I64_MAX)]


class SLOField(_Body):
    """Per-request latency objectives (milliseconds), overriding the server's defaults.
    ``class`` names the SLO class the request is counted under in /metrics."""

    ttft_ms: Optional[StrictFloat] = Field(default=None, ge=MIN_SLO_MS, le=1e9)
    tpot_ms: Optional[StrictFloat] = Field(default=None, ge=MIN_SLO_MS, le=1e9)
    slo_class: Optional[StrictStr] = Field(default=None, alias="class", max_length=64)

    @field_validator("ttft_ms", "tpot_ms")
    @classmethod
    def _positive_in_seconds(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not v / 1000.0 > 0:    # what the scheduler will be given
            raise ValueError(f"must be at least {MIN_SLO_MS:g} ms")
        return v


class StreamOptions(_Body):
    include_usage: Optional[StrictBool] = False
    continuous_usage_stats: Optional[StrictBool] = False


class _Sampling(_Body):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1, le=I64_MAX)
    temperature: Optional[StrictFloat] = Field(default=None, ge=0, le=1e6)
    top_p: Optional[StrictFloat] = Field(default=None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(default=None, ge=-1, le=I64_MAX)
    seed: Optional[StrictInt] = Field(default=None, ge=-I64_MAX, le=I64_MAX)
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: Optional[Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP)]]] = None
    stop_token_ids: Optional[list[TokenId]] = Field(default=None, max_length=MAX_STOP_IDS)
    ignore_eos: StrictBool = False
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    priority: StrictInt = Field(default=0, ge=-(2**31), le=2**31 - 1)
    slo: Optional[SLOField] = None
    user: Optional[StrictStr] = None
    presence_penalty: Optional[StrictFloat] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[StrictFloat] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[dict[str, StrictFloat]] = None
    best_of: Optional[StrictInt] = Field(default=None, ge=1, le=MAX_CHOICES)
    # vLLM's sampling extensions (their meaning: engine/params.py SamplingParams)
    min_tokens: StrictInt = Field(default=0, ge=0, le=I64_MAX)
    repetition_penalty: Optional[StrictFloat] = Field(default=None, gt=0, le=1e6)
    min_p: Optional[StrictFloat] = Field(default=None, ge=0, le=1)
    allowed_token_ids: Optional[list[TokenId]] = Field(default=None, min_length=1, max_length=1 << 20)
    prompt_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    include_stop_str_in_output: StrictBool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in items if s]

    def unsupported(self) -> str | None:
        """The first requested feature this server does not implement, if any
        (``server/unsupported.py`` lists the fields refused rather than ignored)."""
        if self.best_of is not None and self.best_of != self.n:
            return "best_of other than n is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options can only be set when stream is true"
        return refused_field(self, COMMON)


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a text, a list of texts, a list of token ids, or
    a list of token-id lists (one choice per prompt, times ``n``)."""

    prompt: Union[StrictStr, Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)],
                  Annotated[list[StrictStr], Field(max_length=MAX_CHOICES)],
                  Annotated[list[Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]],
                            Field(max_length=MAX_CHOICES)]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    suffix: Optional[StrictStr] = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported() or refused_field(self, COMPLETIONS)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr = Field(max_length=64)
    content: Optional[Union[StrictStr, Annotated[list[TextPart], Field(max_length=MAX_PARTS)]]] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1, le=I64_MAX)
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def unsupported(self) -> str | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs set to true"
        if self.tools:
            return "tools are not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported"
        return super().unsupported() or refused_field(self, CHAT)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
