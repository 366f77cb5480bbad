"""How many prompt tokens a request will ask a backend to prefill, estimated from its
JSON body: the router routes on prompt length and has no tokenizer."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 4.0          # prompt-length estimate for text prompts (no tokenizer here)


def _text_tokens(s: str) -> int:
    return max(1, math.ceil(len(s.encode("utf-8", "replace")) / CHARS_PER_TOKEN)) if s else 0


def estimate_prompt_tokens(path: str, body: Mapping[str, Any]) -> int:
    """Prompt tokens a request will ask the backend to prefill: exact for token-id prompts,
    ``bytes / 4`` for text (the router has no tokenizer), times ``n``. Never raises: a body
    the backend will refuse gets some estimate and the backend's own 400."""
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    total = 0
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        for m in msgs if isinstance(msgs, list) else ():
            if not isinstance(m, dict):
                continue
            total += 4                                    # role and template tokens
            c = m.get("content")
            if isinstance(c, str):
                total += _text_tokens(c)
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += _text_tokens(part["text"])
    else:
        p = body.get("prompt")
        if isinstance(p, str):
            total = _text_tokens(p)
        elif isinstance(p, list) and p:
            if all(isinstance(t, int) for t in p):
                total = len(p)
            else:
                for q in p:
                    if isinstance(q, str):
                        total += _text_tokens(q)
                    elif isinstance(q, list):
                        total += len(q)
    return max(1, total) * n
