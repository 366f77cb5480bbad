"""Tokenizers: the model directory's HF ``tokenizer.json`` (via ``tokenizers``), or a
byte-level one for dummy models so that text in / text out always works.

Byte tokenizer: ids 0..255 are bytes, 256 is BOS, 257 is EOS; a random model samples ids
beyond that too, which decode as ``id % 256`` so its output is still visible text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    BOS = 256
    EOS = 257

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 258:
            raise ValueError(f"the byte tokenizer needs a vocabulary of at least 258 ids, the model has {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_ids = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) or [self.BOS]

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif i > self.EOS:
                out.append(i % 256)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path / "tokenizer.json"))
        eos = set(eos_token_ids)
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("eos_token")
                if isinstance(name, dict):
                    name = name.get("content")
                tid = self._tok.token_to_id(name) if isinstance(name, str) else None
                if tid is not None:
                    eos.add(tid)
            except json.JSONDecodeError:
                pass   # optional hints only
        self.eos_token_ids = tuple(sorted(eos))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path | None, vocab_size: int,
                   eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(model_dir), eos_token_ids)
    return ByteTokenizer(vocab_size)
