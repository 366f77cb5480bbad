"""Server and bench pieces without a server: incremental detokenisation and stop strings,
chat templates, SSE token timing, goodput parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from fairbatch.bench.client import _token_times  # noqa: E402
from fairbatch.engine.tokenizer import ByteTokenizer  # noqa: E402
from fairbatch.server.model import ChatTemplate  # noqa: E402
from fairbatch.server.output import OutputProcessor  # noqa: E402

tok = ByteTokenizer(512)
ids = st.lists(st.integers(0, 511) | st.integers(0x20, 0x7E) | st.sampled_from([0xE2, 0x82, 0xAC, 0xF0, 0x9F]),
               max_size=60)
cuts = st.lists(st.integers(1, 4), min_size=1, max_size=60)


def feed_all(proc: OutputProcessor, seq: list[int], sizes: list[int]) -> tuple[str, list[str]]:
    out, pieces, i, k = "", [], 0, 0
    while i < len(seq):
        n = sizes[k % len(sizes)]
        k += 1
        chunk = seq[i:i + n]
        i += n
        piece = proc.feed(chunk, final=i >= len(seq))
        pieces.append(piece)
        out += piece
        if proc.finish_reason is not None:
            break
    return out, pieces


@settings(max_examples=300, deadline=None)
@given(seq=ids.filter(bool), sizes=cuts)
def test_incremental_detokenisation_equals_full_decode(seq, sizes):
    out, _ = feed_all(OutputProcessor(tok.decode), seq, sizes)
    assert out == tok.decode(seq)


@settings(max_examples=300, deadline=None)
@given(seq=ids.filter(bool), sizes=cuts, stop=st.text(alphabet="abc/€", min_size=1, max_size=3))
def test_stop_strings_cut_at_first_match_and_never_leak(seq, sizes, stop):
    full = tok.decode(seq)
    proc = OutputProcessor(tok.decode, [stop])
    out, pieces = feed_all(proc, seq, sizes)
    if stop in full:
        assert proc.finish_reason == "stop"
        assert out == full[:full.index(stop)]
    else:
        assert proc.finish_reason is None and out == full
    assert stop not in out


def test_chat_template_from_tokenizer_config(tmp_path):
    tpl = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tpl, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    t = ChatTemplate.from_dir(tmp_path)
    assert t.is_model_template
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs) == "<s><|user|>hi</s><|assistant|>"
    assert t.render(msgs, add_generation_prompt=False) == "<s><|user|>hi</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"}))
    t = ChatTemplate.from_dir(tmp_path)
    with pytest.raises(ValueError, match="user first"):
        t.render([{"role": "system", "content": "x"}])
    plain = ChatTemplate.from_dir(None)
    assert not plain.is_model_template
    assert plain.render(msgs) == "user: hi\nassistant:"


def test_token_times_reconcile_events_with_usage():
    t = [1.0, 2.0, 3.0]
    assert _token_times(t, 3).tolist() == t
    assert _token_times(t, 5).tolist() == [1.0, 2.0, 3.0, 3.0, 3.0]     # packed events
    assert _token_times(t + [3.5], 3).tolist() == t                        # closing event with no token
    assert len(_token_times([], 4)) == 0 and isinstance(_token_times(t, 0), np.ndarray)


def test_hf_tokenizer_directory_chat_template_end_to_end(tmp_path):
    """A model directory with config.json, tokenizer.json and a chat template (dummy weights):
    chat prompts are rendered by the template and tokenised without a second BOS."""
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    httpx = pytest.importorskip("httpx")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from fairbatch.server import ServerThread, build_app, load_served_model
    from fairbatch.specs import get_model

    cfg = get_model("tiny-llama").to_hf_config()
    cfg.update(bos_token_id=1, eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"])
    tk.train_from_iterator(["hello world how are you", "fine thanks and you"], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    model = load_served_model(str(tmp_path), load_format="dummy", cpu_threads=1)
    text, ids = model.chat_prompt([{"role": "user", "content": "hello world"}])
    assert text == "<s><|user|> hello world <|assistant|>"
    assert ids[0] == 1 and ids.count(1) == 1                   # one BOS: the template's
    assert model.encode("hello")[0] == 1                       # plain prompts get the tokenizer's BOS
    with ServerThread(build_app(model)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3, "ignore_eos": True},
            timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids) and r.json()["model"] == tmp_path.name   # a directory by its name
