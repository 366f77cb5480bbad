"""vLLM's request parameters over HTTP: what a vLLM user sends gets vLLM's answer or a
clear 400, never a silent default. A real uvicorn (background thread) on the tiny dummy
model; greedy requests, so every answer is reproducible."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from support import metric, wait_for  # noqa: E402

MODEL = "tiny-llama"
PROMPT = [72, 101, 108, 108, 111, 32, 119]          # "Hello w" in the byte tokenizer


@pytest.fixture(scope="module")
def server():
    model = load_served_model(MODEL, load_format="dummy", policy="vllm", cpu_threads=1)
    app = build_app(model)
    with ServerThread(app) as s:
        s.app = app
        s.eos = model.info.eos_token_ids[0]
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(http, **body):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(http, path, body) -> list[dict]:
    out = []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


# --- item 1: role and echo chunks travel with the first token -------------------------------
def test_chat_role_chunk_comes_with_each_choices_first_token(http):
    evs = events(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                 "max_tokens": 4, "ignore_eos": True, "temperature": 0})
    seen: set[int] = set()
    for j, ev in enumerate(evs):
        [c] = ev["choices"]
        if "role" in c["delta"]:
            # the very next event is the same choice's first token: no role chunk goes out
            # ahead of the output it announces
            nxt = evs[j + 1]["choices"][0]
            assert c["index"] not in seen and nxt["index"] == c["index"] and "role" not in nxt["delta"]
            seen.add(c["index"])
        else:
            assert c["index"] in seen
    assert seen == {0, 1}
    assert sum(1 for ev in evs if "role" not in ev["choices"][0]["delta"]) == 8    # one event per token


def test_completion_echo_rides_on_the_first_token(http):
    body = {"prompt": "Hello", "echo": True, "max_tokens": 3, "ignore_eos": True, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    texts = [ev["choices"][0]["text"] for ev in events(http, "/v1/completions", body)]
    # one event per token, the echoed prompt in the first: never a chunk ahead of the output
    assert len(texts) == 3 and texts[0].startswith("Hello")
    assert "".join(texts) == whole and whole.startswith("Hello")


# --- item 2: sampling parameters ------------------------------------------------------------
def test_min_tokens_holds_eos_back_then_it_stops(http, server):
    eos = server.eos
    r = complete(http, max_tokens=12, min_tokens=5, logit_bias={str(eos): 100})
    c = r["choices"][0]
    assert r["usage"]["completion_tokens"] == 6            # 5 forced, then EOS
    assert c["finish_reason"] == "stop" and c["stop_reason"] is None   # EOS: no stop_reason, as vLLM


def test_stop_token_id_is_the_stop_reason(http):
    r = complete(http, max_tokens=12, allowed_token_ids=[65, 66], stop_token_ids=[66],
                 logit_bias={"66": 50})
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == 66
    assert c["text"] == "" and r["usage"]["completion_tokens"] == 1     # the stop token's text is not shown
    r = complete(http, max_tokens=12, allowed_token_ids=[65, 66], stop_token_ids=[66], logit_bias={"66": 50},
                 include_stop_str_in_output=True)
    assert r["choices"][0]["text"] == "B"


def test_allowed_token_ids_and_penalties_shape_greedy_output(http):
    r = complete(http, max_tokens=8, ignore_eos=True, allowed_token_ids=[97, 98, 99])
    assert set(r["choices"][0]["text"]) <= set("abc")
    # equal biases lift the three far above zero; CTRL's penalty then divides a used
    # token's logit by 1e6, so each is used once before any repeats
    abc = {"97": 50, "98": 50, "99": 50}
    r = complete(http, max_tokens=3, ignore_eos=True, allowed_token_ids=[97, 98, 99], logit_bias=abc,
                 repetition_penalty=1e6, prompt=[1])
    assert sorted(r["choices"][0]["text"]) == ["a", "b", "c"]
    # frequency and presence penalties keep the counts of the three level; without them
    # the greedy output of this model repeats one letter
    plain = complete(http, max_tokens=9, ignore_eos=True, allowed_token_ids=[97, 98, 99], logit_bias=abc,
                     prompt=[1])["choices"][0]["text"]
    fair = complete(http, max_tokens=9, ignore_eos=True, allowed_token_ids=[97, 98, 99], logit_bias=abc,
                    prompt=[1], frequency_penalty=2, presence_penalty=2)["choices"][0]["text"]
    assert max(map(plain.count, "abc")) > 3
    assert sorted(map(fair.count, "abc")) == [3, 3, 3]


def test_stop_string_reason_include_and_metrics(http, server):
    full = complete(http, max_tokens=16, ignore_eos=True, allowed_token_ids=list(range(97, 123)))["choices"][0]["text"]
    stop = full[4:6]
    cut = full.find(stop)
    text_of = lambda **kw: complete(http, max_tokens=16, ignore_eos=True, allowed_token_ids=list(range(97, 123)),
                                    stop=[stop], **kw)["choices"][0]
    m0 = http.get("/metrics").text
    c = text_of()
    assert c["text"] == full[:cut] and c["finish_reason"] == "stop" and c["stop_reason"] == stop
    assert text_of(include_stop_str_in_output=True)["text"] == full[:cut + len(stop)]
    # min_tokens: a stop string inside the first min_tokens tokens does not count
    late = text_of(min_tokens=cut + len(stop))
    assert len(late["text"]) > cut
    m1 = http.get("/metrics").text
    stop_count = lambda t: metric(t, "fairbatch:request_success_total", finished_reason="stop")
    assert stop_count(m1) - stop_count(m0) >= 2
    assert metric(m1, "fairbatch:request_aborted_total") == metric(m0, "fairbatch:request_aborted_total")


@pytest.mark.parametrize("path,body,word", [
    ("/v1/completions", {"repetition_penalty": -5}, "repetition_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"allowed_token_ids": [10 ** 9]}, "allowed_token_ids"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"skip_special_tokens": False}, "skip_special_tokens"),
    ("/v1/chat/completions", {"chat_template": "{{ messages }}"}, "chat_template"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("/v1/completions", {"add_special_tokens": False}, "add_special_tokens"),
    ("/v1/chat/completions", {"add_special_tokens": True}, "add_special_tokens"),
])
def test_unsupported_or_invalid_is_a_clear_400(http, path, body, word):
    base = {"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]}
    r = http.post(path, json={**base, "max_tokens": 4, **body})
    assert r.status_code == 400, (body, r.text)
    assert word in r.json()["error"]["message"]


def test_off_values_of_refused_fields_are_accepted(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "skip_special_tokens": True,
                                            "use_beam_search": False, "structured_outputs": None})
    assert r.status_code == 200, r.text


# --- logprobs --------------------------------------------------------------------------------
def test_completion_logprobs_shape(http):
    r = complete(http, max_tokens=4, ignore_eos=True, logprobs=2)
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    assert len(lp["tokens"]) == 4 and "".join(lp["tokens"]) == r["choices"][0]["text"]
    for tok_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        # greedy: the chosen token is the most likely (several ids may decode to one text,
        # which keeps one of their values, as vLLM's text-keyed dict does)
        assert 1 <= len(top) <= 3 and max(top.values()) <= tok_lp + 1e-6
    assert lp["text_offset"][0] == 0
    # echo: the prompt's tokens first, the first of them unscored
    r = complete(http, max_tokens=2, ignore_eos=True, logprobs=1, echo=True)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 2 and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])


def test_streamed_logprobs_match_the_whole_answer(http):
    whole = complete(http, max_tokens=4, ignore_eos=True, logprobs=1)["choices"][0]["logprobs"]
    evs = events(http, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "max_tokens": 4,
                                           "ignore_eos": True, "logprobs": 1})
    streamed = [x for ev in evs for x in ev["choices"][0]["logprobs"]["token_logprobs"]]
    offsets = [x for ev in evs for x in ev["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == pytest.approx(whole["token_logprobs"]) and offsets == whole["text_offset"]


def test_chat_logprobs_shape(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                 "ignore_eos": True, "temperature": 0, "logprobs": True,
                                                 "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["token"] == item["token"]
        assert item["bytes"] == list(item["token"].encode("utf-8", errors="replace"))
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.json()["choices"][0]["logprobs"] is None


def test_prompt_logprobs(http):
    c = complete(http, max_tokens=1, prompt_logprobs=1)["choices"][0]
    plp = c["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for pos in range(1, len(PROMPT)):
        entry = plp[pos][str(PROMPT[pos])]
        assert set(entry) == {"logprob", "rank", "decoded_token"} and entry["rank"] >= 1
        assert 1 <= len(plp[pos]) <= 2
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                 "prompt_logprobs": 0})
    body = r.json()
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]


def test_server_idles_after_all_this(server):
    app = server.app
    wait_for(lambda: app.state.engine.num_active == 0 and app.state.model.allocator.num_free
             == app.state.model.allocator.num_blocks, "every request released")


def test_engine_process_gives_the_same_answers(http):
    """The same requests through the engine in its own process (what `fairbatch serve`
    runs): logprobs, prompt logprobs and stop reasons cross the process boundary intact."""
    from fairbatch.server.engine_process import spawn_engine
    from fairbatch.server.model import ServedModel

    info, backend = spawn_engine(dict(model=MODEL, load_format="dummy", policy="vllm", cpu_threads=1),
                                 warmup=False, log_level="WARNING")
    bodies = [dict(max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1, echo=True),
              dict(max_tokens=12, allowed_token_ids=[65, 66], stop_token_ids=[66], logit_bias={"66": 50}),
              dict(max_tokens=5, min_tokens=3, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5)]
    with ServerThread(build_app(ServedModel(info), backend=backend)) as remote, \
            httpx.Client(base_url=remote.url, timeout=60) as rc:
        for body in bodies:
            here = complete(http, **body)["choices"]
            r = rc.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
            assert r.status_code == 200, r.text
            there = r.json()["choices"]
            assert json.dumps(there, sort_keys=True) == json.dumps(here, sort_keys=True) or \
                _close(there, here), body


def _close(a, b) -> bool:
    """Equal up to float rounding in logprob values."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-4
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b
