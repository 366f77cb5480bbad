"""Names of a request's prompt blocks, for the ``prefix`` router, from its JSON body.

The router has no tokenizer. A token-id prompt (``/v1/completions`` with a list of ints,
as ``fairbatch bench`` sends) is cut into blocks of ``block_size`` tokens, as an instance
cuts its KV; text into blocks of ``CHARS_PER_TOKEN * block_size`` characters (about one
KV block each). Each full block's name is a hash of its parent's name and its contents,
so two prompts that share their first N blocks share their first N names, which is all
the router needs to send them to the same backend. A chat is its messages' roles and
texts, concatenated with separators that do not occur in text, so a conversation's next
turn extends the last turn's names.

The names are the router's own: Python's 64-bit ``hash`` (salted per process; each
router worker keeps its own index anyway), about 10x cheaper than the engine's blake2b
names (``kv.prompt_block_hashes``: 1.8 ms for an 8k-token prompt on the dev machine, of
which the router needs none: it never compares its names with an instance's). A
collision only misroutes a request. A batch (several prompts in one body) is named by its
first prompt; a body the backend will refuse gets some names (or none) and the backend's
own 400.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from fairbatch.cluster.router.prompt_estimate import CHARS_PER_TOKEN

_ROLE_END, _MESSAGE_END = "\x1e", "\x1f"     # record separators: never in a chat's text


def _chain(blocks: Iterable[bytes | str]) -> list[int]:
    out: list[int] = []
    h = 0
    for b in blocks:
        h = hash((h, b))
        out.append(h)
    return out


def text_block_hashes(text: str, chars: int) -> list[int]:
    """One name per full ``chars``-character block of ``text``."""
    return _chain(text[s:s + chars] for s in range(0, len(text) - chars + 1, chars))


def token_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """One name per full ``block_size``-token block of ``token_ids`` (ints that fit 64
    bits; TypeError or OverflowError otherwise)."""
    raw = array("q", token_ids).tobytes()
    step = 8 * block_size
    return _chain(raw[s:s + step] for s in range(0, len(raw) - step + 1, step))


def chat_text(messages: Any) -> str:
    """A chat's messages as one string: role, separator, text (string content or the
    text parts of a list), separator."""
    parts: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        parts.append(str(m.get("role", "")))
        parts.append(_ROLE_END)
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        parts.append(_MESSAGE_END)
    return "".join(parts)


def prompt_hashes(path: str, body: Mapping[str, Any], block_size: int) -> list[int]:
    """The block names the ``prefix`` router routes the body on (never raises)."""
    chars = int(CHARS_PER_TOKEN * block_size)
    if path.endswith("/chat/completions"):
        return text_block_hashes(chat_text(body.get("messages")), chars)
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        p = p[0]                        # a batch: its first prompt
    if isinstance(p, str):
        return text_block_hashes(p, chars)
    if isinstance(p, list):
        try:
            return token_block_hashes(p, block_size)
        except (TypeError, OverflowError):   # not token ids: the backend's 400
            return []
    return []
