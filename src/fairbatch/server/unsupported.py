"""Request fields this server knows and does not implement: each is a 400 naming it,
never silently ignored.

Unknown fields are still accepted (clients send other servers' extensions, and vLLM
accepts them too). But a field a vLLM or OpenAI user sets expecting an effect (a
grammar, a chat template, beam search) would silently change the answer's meaning if
dropped, so those are listed here with the value that means "off" (which is accepted).
``vllm_xargs`` (custom arguments for vLLM plugins; ``fairbatch bench`` sends its SLO there
for our vLLM scheduler plugin) and ``kv_transfer_params`` (disaggregated-serving
metadata gateways attach) carry no meaning here and stay ignored like unknown fields.
"""

from __future__ import annotations

from typing import Any

_OFF = (None, False, [], {}, "")

# field -> values that ask for nothing (accepted); any other value is refused
COMMON: dict[str, tuple[Any, ...]] = {
    "structured_outputs": _OFF,
    "guided_json": _OFF, "guided_regex": _OFF, "guided_choice": _OFF, "guided_grammar": _OFF,
    "guided_whitespace_pattern": _OFF, "guided_decoding_backend": _OFF,
    "bad_words": _OFF,
    "logits_processors": _OFF,
    "use_beam_search": _OFF, "length_penalty": (None, 1, 1.0),
    "truncate_prompt_tokens": (None,),
    "prompt_embeds": _OFF,
    "return_tokens_as_token_ids": _OFF,
    "return_token_ids": _OFF,
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "allowed_token_ids_mask": _OFF,
    "lora_request": _OFF,
    "thinking_token_budget": (None,),
}
COMPLETIONS: dict[str, tuple[Any, ...]] = {
    "response_format": _OFF,
    "add_special_tokens": (None, True),     # vLLM's default here: the tokenizer's BOS is added
}
CHAT: dict[str, tuple[Any, ...]] = {
    "chat_template": _OFF,
    "continue_final_message": _OFF,
    "echo": _OFF,
    "documents": _OFF,
    "mm_processor_kwargs": _OFF,
    "functions": _OFF, "function_call": (None, "none", "auto"),
    "audio": _OFF, "prediction": _OFF,
    "modalities": (None, [], ["text"]),
    "parallel_tool_calls": (None, True, False),
    "add_special_tokens": (None, False),    # vLLM's default here: the template writes its own
}


def refused_field(body: Any, table: dict[str, tuple[Any, ...]]) -> str | None:
    """The first field of ``body`` (a pydantic request, its unknown fields included) set
    to a value this server cannot honour, as a message."""
    extra = body.model_extra or {}
    declared = type(body).model_fields
    for name, off in table.items():
        if name in extra:
            value = extra[name]
        elif name in declared:
            value = getattr(body, name)
        else:
            continue
        if not any(value is v or (type(value) is type(v) and value == v) for v in off):
            return f"'{name}' is not supported by this server"
    return None
