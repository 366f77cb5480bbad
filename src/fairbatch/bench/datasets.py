"""`vllm bench serve`'s text datasets, turned into token-id requests.

Bench sends token ids (exact prompt lengths, no client tokenizer needed). For a text
dataset the ids come from the server's own ``POST /tokenize`` (vLLM's endpoint, which
`fairbatch serve` has too), so the server sees the same tokens it would get from the
text, and the lengths are the server's.

- ``sharegpt`` (``--dataset-path`` a ShareGPT JSON list of ``{"conversations": [...]}``):
  the first turn is the prompt, the second the reference answer, whose token count is
  the output length unless ``--sharegpt-output-len``; as vLLM, conversations with
  fewer than two turns are skipped, and so are pairs with a prompt or an output under 4
  tokens, a prompt over 1024 or a total over 2048 (without ``--sharegpt-output-len``).
- ``custom`` (``--dataset-path`` a JSONL file of ``{"prompt": text}``): every line's
  prompt, ``--custom-output-len`` tokens out (vLLM's default 256). vLLM applies the chat
  template to custom prompts unless told not to; here they go as raw text (completions),
  as ``--custom-skip-chat-template`` does there.

vLLM shuffles ShareGPT with its own generator; here the file order is kept (with
``--seed`` shuffling it), so the same seed picks different conversations than vLLM's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx

MIN_LEN, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048     # vLLM's is_valid_sequence defaults


class DatasetError(ValueError):
    pass


def tokenize(base_url: str, model: str, text: str, client: httpx.Client) -> list[int]:
    r = client.post(base_url.rstrip("/") + "/tokenize", json={"model": model, "prompt": text})
    if r.status_code != 200:
        raise DatasetError(f"{base_url}/tokenize answered HTTP {r.status_code}: a text dataset needs the "
                           f"server's /tokenize (vLLM's endpoint; fairbatch serve has it)")
    return list(r.json()["tokens"])


def sharegpt_pairs(path: Path, seed: int) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read ShareGPT file {path}: {e}") from None
    pairs = []
    for item in data if isinstance(data, list) else []:
        conv = item.get("conversations") if isinstance(item, dict) else None
        if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) for t in conv[:2]):
            a, b = conv[0].get("value"), conv[1].get("value")
            if isinstance(a, str) and isinstance(b, str):
                pairs.append((a, b))
    if not pairs:
        raise DatasetError(f"{path}: no conversation with two turns (ShareGPT format)")
    random.Random(seed).shuffle(pairs)
    return pairs


def custom_prompts(path: Path) -> list[str]:
    prompts = []
    try:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise DatasetError(f"{path}:{n}: expected a JSON object with a 'prompt' string")
            prompts.append(obj["prompt"])
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read custom dataset {path}: {e}") from None
    if not prompts:
        raise DatasetError(f"{path}: no prompts")
    return prompts


def load_text_dataset(name: str, path: str | None, n: int, base_url: str, model: str, *, seed: int = 0,
                      sharegpt_output_len: int | None = None, custom_output_len: int = 256
                      ) -> list[tuple[list[int], int]]:
    """Up to ``n`` (prompt token ids, output length) pairs."""
    if not path:
        raise DatasetError(f"--dataset-name {name} needs --dataset-path")
    p = Path(path).expanduser()
    out: list[tuple[list[int], int]] = []
    with httpx.Client(timeout=60.0) as client:
        if name == "sharegpt":
            for prompt, answer in sharegpt_pairs(p, seed):
                if len(out) == n:
                    break
                ids = tokenize(base_url, model, prompt, client)
                fixed = sharegpt_output_len is not None
                out_len = sharegpt_output_len if fixed else len(tokenize(base_url, model, answer, client))
                if not fixed and (len(ids) < MIN_LEN or out_len < MIN_LEN or len(ids) > MAX_PROMPT
                                  or len(ids) + out_len > MAX_TOTAL):
                    continue
                out.append((ids, out_len))
        elif name == "custom":
            for prompt in custom_prompts(p)[:n]:
                out.append((tokenize(base_url, model, prompt, client), custom_output_len))
        else:
            raise DatasetError(f"unknown text dataset {name!r}")
    if not out:
        raise DatasetError(f"{p}: no usable request (every prompt too short or too long)")
    return out
