"""``ServedModel``: what the server needs of an engine, adapted from ``fairbatch.engine.LLM``.

The server only touches the engine through this class: tokenizer (encode / decode / chat
template), limits (vocabulary, context), building a scheduler ``Request`` from a
validated prompt, and the ``Instance`` the engine thread steps. Everything here raises
``ValueError`` with a client-facing message for a bad prompt; the app turns that into 400.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fairbatch.engine.params import SamplingParams
from fairbatch.request import SLO, Request

log = logging.getLogger("fairbatch.server")


class ChatTemplate:
    """The tokenizer's Jinja chat template (HF ``tokenizer_config.json`` / ``chat_template.jinja``),
    or a plain ``role: content`` layout when the model has none."""

    def __init__(self, source: str | None = None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled: Any = None
        if source is not None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:   # jinja2 missing: serve with the plain layout rather than fail
                log.warning("jinja2 is not installed: using the plain chat layout instead of the model's template")
                self.source = None
            else:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise_template_error
                env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
                self._compiled = env.from_string(source)

    @property
    def is_model_template(self) -> bool:
        return self._compiled is not None

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> str:
        if self._compiled is None:
            lines = [f"{m['role']}: {m['content']}\n" for m in messages]
            return "".join(lines) + ("assistant:" if add_generation_prompt else "")
        kwargs = dict(extra or {})
        kwargs.update(messages=list(messages), add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return self._compiled.render(**kwargs)
        except ValueError:
            raise
        except Exception as e:   # a template error caused by the messages: the client's
            raise ValueError(f"chat template failed on these messages: {e}") from None

    @classmethod
    def from_dir(cls, directory: str | Path | None) -> "ChatTemplate":
        if directory is None:
            return cls()
        d = Path(directory)
        cfg: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                log.warning("ignoring unreadable %s: %s", cfg_path, e)
        source = cfg.get("chat_template")
        if isinstance(source, list):   # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = d / "chat_template.jinja"
        if not isinstance(source, str) and jinja_file.is_file():
            source = jinja_file.read_text()
        return cls(source if isinstance(source, str) else None,
                   bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")))


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else ""


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class ServedModel:
    """An ``LLM`` as the server sees it. ``name`` is the id clients pass as ``model``."""

    def __init__(self, llm: Any, name: str | None = None, *, aliases: Sequence[str] = ()) -> None:
        self.llm = llm
        engine = llm.engine
        self.instance = llm.instance
        self.scheduler = llm.scheduler
        self.allocator = engine.allocator
        self.tokenizer = llm.tokenizer
        self.vocab_size: int = int(engine.config.vocab_size)
        self.max_model_len: int = int(llm.scheduler_config.max_model_len)
        self.policy: str = llm.policy
        cfg = llm.scheduler_config
        self.default_slo = SLO(cfg.ttft_slo, cfg.tpot_slo, "default")
        self.name = name or str(engine.args.model)
        self.names = {self.name, str(engine.args.model), *aliases}
        tok_dir = engine.args.tokenizer or (engine.args.model if Path(engine.args.model).is_dir() else None)
        self.chat_template = ChatTemplate.from_dir(tok_dir)
        self.device = str(engine.device)

    def thread_init(self) -> None:
        """Called first thing in the engine thread: CUDA's current device is per thread, and
        Triton launches on the current device."""
        dev = self.llm.engine.device
        if getattr(dev, "type", None) == "cuda":
            import torch

            # "cuda" without an index means the current device, which set_device refuses.
            torch.cuda.set_device(dev.index if dev.index is not None else torch.cuda.current_device())

    # --- tokenizer -----------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ValueError for text no tokenizer can take (lone surrogates)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode: {e.reason} at position {e.start}") from None
        if not add_special_tokens:
            raw = getattr(self.tokenizer, "_tok", None)   # HFTokenizer wraps tokenizers.Tokenizer
            if raw is not None:
                return list(raw.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_prompt(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    extra: dict[str, Any] | None = None) -> tuple[str, list[int]]:
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, extra=extra)
        # A model template writes its own BOS; the plain layout relies on the tokenizer's.
        ids = self.encode(text, add_special_tokens=not self.chat_template.is_model_template)
        return text, ids

    # --- requests ------------------------------------------------------------------------
    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The max_tokens to use (default: all the context left); ValueError if it does not fit."""
        limit = self.max_model_len
        if prompt_len < 1:
            raise ValueError("empty prompt: it must have at least one token")
        if prompt_len > limit - 1:
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                             f"{prompt_len} tokens (leaving no room for an output token).")
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                             f"completion). Please reduce the prompt or max_tokens.")
        return max_tokens

    def make_request(self, request_id: str, prompt_ids: list[int], sp: SamplingParams, *, slo: SLO,
                     priority: int = 0, arrival: float = 0.0) -> Request:
        req = self.llm.make_request(prompt_ids, sp, slo=slo, request_id=request_id)
        req.arrival = arrival
        req.priority = priority
        return req
