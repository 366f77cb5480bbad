"""``ServedModel``: what the server's front end needs of the model, from a ``ModelInfo``.

The front end only touches the model through this class: tokenizer (encode / decode / chat
template), limits (vocabulary, context), building a scheduler ``Request`` from a
validated prompt. Everything here raises
``ValueError`` with a client-facing message for a bad prompt; the app turns that into 400.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairbatch.engine.params import SamplingParams, prefix_cache_hashes
from fairbatch.kv import check_fits
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


def public_name(model: str) -> str:
    """The id clients see for ``--model``: a preset's name, or a model directory's last
    component. The full path would tell every client where the server keeps its files
    (it is still accepted as ``model`` in requests)."""
    p = Path(model)
    return p.name if p.is_dir() and p.name else model


@dataclass(frozen=True)
class ModelInfo:
    """What the front end knows of the engine: plain data, sent by an engine process once
    its model is loaded."""

    name: str                        # the id clients pass as ``model``
    model: str                       # --model as given (preset or directory)
    policy: str
    vocab_size: int
    max_model_len: int
    ttft_slo: float
    tpot_slo: float
    device: str
    num_blocks: int
    block_size: int
    tokenizer_dir: str | None
    eos_token_ids: tuple[int, ...] = ()
    prefix_caching: bool = False     # the engine reuses cached prompt blocks (requests carry their names)

    @classmethod
    def of_llm(cls, llm: Any, name: str | None = None) -> "ModelInfo":
        engine = llm.engine
        args = engine.args
        tok_dir = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
        cfg = llm.scheduler_config
        return cls(name=name or public_name(str(args.model)), model=str(args.model), policy=llm.policy,
                   vocab_size=int(engine.config.vocab_size), max_model_len=int(cfg.max_model_len),
                   ttft_slo=cfg.ttft_slo, tpot_slo=cfg.tpot_slo, device=str(engine.device),
                   num_blocks=engine.allocator.num_blocks, block_size=engine.allocator.block_size,
                   tokenizer_dir=str(tok_dir) if tok_dir is not None else None,
                   eos_token_ids=tuple(engine.eos_token_ids), prefix_caching=bool(engine.allocator.prefix_caching))


class ServedModel:
    """The model as the server's front end sees it: tokenizer, chat template, limits, and
    building a scheduler ``Request`` from a validated prompt. ``llm`` is the in-process
    engine when there is one (``ThreadBackend``); with an engine process it is None."""

    def __init__(self, info: ModelInfo, *, llm: Any = None, aliases: Sequence[str] = ()) -> None:
        from fairbatch.engine.tokenizer import load_tokenizer

        self.info = info
        self.llm = llm
        self.instance = llm.instance if llm is not None else None
        self.scheduler = llm.scheduler if llm is not None else None
        self.allocator = llm.engine.allocator if llm is not None else None
        self.tokenizer = llm.tokenizer if llm is not None else load_tokenizer(
            info.tokenizer_dir, info.vocab_size, info.eos_token_ids)
        self.vocab_size = info.vocab_size
        self.max_model_len = info.max_model_len
        self.policy = info.policy
        self.default_slo = SLO(info.ttft_slo, info.tpot_slo, "default")
        self.name = info.name
        self.names = {info.name, info.model, *aliases}
        self.num_blocks = info.num_blocks
        self.chat_template = ChatTemplate.from_dir(info.tokenizer_dir)
        self.device = info.device
        self.prefix_caching = info.prefix_caching

    @classmethod
    def of_llm(cls, llm: Any, name: str | None = None, *, aliases: Sequence[str] = ()) -> "ServedModel":
        return cls(ModelInfo.of_llm(llm, name), llm=llm, aliases=aliases)

    def thread_init(self) -> None:
        """Called first thing in the engine's thread: CUDA's current device is per thread,
        and Triton launches on the current device."""
        dev = self.llm.engine.device
        if getattr(dev, "type", None) == "cuda":
            import torch

            # "cuda" without an index means the current device, which set_device refuses.
            torch.cuda.set_device(dev.index if dev.index is not None else torch.cuda.current_device())

    # --- tokenizer -----------------------------------------------------------------------
    # A text longer than this many characters per token of context is first tokenized in
    # part: if that part alone overflows the context, the rest is never tokenized. Building
    # the id list of a text is C code that holds the GIL (tens of millions of ids: seconds
    # in which no other stream moves); no real tokenizer averages 8 characters a token.
    PROBE_CHARS_PER_TOKEN = 8

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ValueError for text no tokenizer can take (lone surrogates)
        and for text that is certainly longer than the context."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode: {e.reason} at position {e.start}") from None
        probe = self.max_model_len * self.PROBE_CHARS_PER_TOKEN
        if len(text) > probe:
            head = self._encode(text[:probe], add_special_tokens)
            if len(head) >= self.max_model_len:
                raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                 f"your prompt is longer: its first {probe} of {len(text)} characters are already "
                                 f"{len(head)} tokens.")
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
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
                     priority: int = 0, arrival: float = 0.0, like: Request | None = None) -> Request:
        """A scheduler ``Request`` for a prompt that passed ``check_length`` and the
        vocabulary check; ValueError if it could never fit the KV cache. With prefix caching,
        its blocks' names are computed here, on the front end, not between engine steps;
        ``like``: another sample of the same prompt and parameters, whose names it shares."""
        info = self.info
        check_fits(len(prompt_ids), sp.max_tokens, info.max_model_len, info.block_size, info.num_blocks)
        req = Request(request_id, arrival, len(prompt_ids), sp.max_tokens, slo,
                      prompt_token_ids=list(prompt_ids), sampling=sp)
        req.priority = priority
        req.block_hashes = like.block_hashes if like is not None else prefix_cache_hashes(
            prompt_ids, sp, info.block_size, info.prefix_caching)
        return req
