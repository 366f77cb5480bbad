"""Names of a request's prompt blocks, for the ``prefix`` router, from its JSON body.

The router has no tokenizer. A token-id prompt (``/v1/completions`` with a list of ints,
as ``fairbatch bench`` sends) is named exactly as an instance names its KV blocks
(``kv.prompt_block_hashes``, ``block_size`` tokens a block). Text is named by blocks of
``CHARS_PER_TOKEN * block_size`` characters (about one KV block each), hash-chained the
same way: two prompts that share their first N characters share their first
``N // (4 * block_size)`` names, which is all the router needs to send them to the same
backend. A chat is its messages' roles and texts, concatenated with separators that do
not occur in text, so a conversation's next turn extends the last turn's names.

A batch (several prompts in one body) is named by its first prompt; a body the backend
will refuse gets some names (or none) and the backend's own 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

from fairbatch.cluster.router.prompt_estimate import CHARS_PER_TOKEN
from fairbatch.kv import prompt_block_hashes

_ROLE_END, _MESSAGE_END = "\x1e", "\x1f"     # record separators: never in a chat's text


def text_block_hashes(text: str, chars: int) -> list[int]:
    """One name per full ``chars``-character block of ``text``, each a 128-bit blake2b of
    its parent's digest and the block's UTF-8 bytes."""
    out: list[int] = []
    parent = b""
    for start in range(0, len(text) - chars + 1, chars):
        parent = blake2b(parent + text[start:start + chars].encode("utf-8", "surrogatepass"),
                         digest_size=16).digest()
        out.append(int.from_bytes(parent, "little"))
    return out


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
    if isinstance(p, list) and p and not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = p[0]                        # a batch: its first prompt
    if isinstance(p, str):
        return text_block_hashes(p, chars)
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        try:
            return prompt_block_hashes(p, block_size)
        except OverflowError:           # ids beyond 64 bits: the backend's 400
            return []
    return []
