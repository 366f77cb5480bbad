"""The server's contract with clients, from issue #14 (hardening): what a bad body gets
(400, documented as such in /openapi.json, with a readable message), bounds checked in
the order that keeps a request's cost small (schema list bounds, then lengths, then the
vocabulary), a body limit sized from the context, defaults that bound a request's work,
and who may call it (API key, Host header). 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from fairbatch.server.body_limit import body_limit  # noqa: E402
from fairbatch.server.commands import default_max_pending  # noqa: E402
from fairbatch.server.model import public_name  # noqa: E402

MODEL = "tiny-llama"
CONTEXT = 256


@pytest.fixture(scope="module")
def model():
    return load_served_model(MODEL, load_format="dummy", policy="fairbatching", cpu_threads=1,
                             max_model_len=CONTEXT, max_num_seqs=64)


@pytest.fixture(scope="module")
def server(model):
    app = build_app(model, max_pending=256, max_choices=8, default_max_tokens=5)
    with ServerThread(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def asgi(app, fn):
    """Run ``fn(client)`` against an app that is not started (no engine): for answers given
    before any handler runs."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return await fn(c)
    return asyncio.run(go())


def error_of(r) -> str:
    return r.json()["error"]["message"]


# --- (3) SLO bounds after conversion -------------------------------------------------------------
@pytest.mark.parametrize("slo", [{"ttft_ms": 1e-321}, {"tpot_ms": 1e-321}, {"ttft_ms": 5e-324, "tpot_ms": 1},
                                 {"ttft_ms": 0}, {"tpot_ms": -1}, {"ttft_ms": 1e-4}])
def test_tiny_or_denormal_slo_is_a_400_not_a_500(http, slo):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "slo": slo})
    assert r.status_code == 400, r.text
    assert "slo" in error_of(r)


def test_smallest_allowed_slo_is_served(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "ignore_eos": True,
                                           "slo": {"ttft_ms": 1e-3, "tpot_ms": 1e-3}})
    assert r.status_code == 200, r.text


# --- (8) contract ---------------------------------------------------------------------------------
def test_openapi_documents_400_and_the_other_errors_not_422(http):
    spec = http.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    for path in ("/v1/completions", "/v1/chat/completions"):
        codes = set(spec["paths"][path]["post"]["responses"])
        assert "422" not in codes
        assert {"200", "400", "404", "405", "413", "429", "503"} <= codes, codes
        ref = spec["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "text/event-stream" in spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_a_schema_violation_is_answered_as_documented(http):
    r = http.post("/v1/completions", json={"prompt": 12})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize("field, value", [("stream", "true"), ("stream", 1), ("ignore_eos", "yes"), ("echo", 0),
                                          ("stream_options", {"include_usage": "true"})])
def test_booleans_are_strict(http, field, value):
    body = {"prompt": "hi", "max_tokens": 2, field: value}
    if field == "stream_options":
        body["stream"] = True
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert field in error_of(r)


@pytest.mark.parametrize("field, value", [("temperature", True), ("top_p", "0.5"), ("slo", {"ttft_ms": False})])
def test_numbers_are_strict(http, field, value):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400 and field in error_of(r), r.text


def test_chat_booleans_are_strict(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "add_generation_prompt": "false"})
    assert r.status_code == 400 and "add_generation_prompt" in error_of(r)


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "abc", "max_tok', ["not valid JSON", "cut short"]),
    (b'{"prompt": [1, 2', ["not valid JSON", "cut short"]),
    (b'{"prompt": "x",, }', ["not valid JSON", "character"]),
    (b"", ["empty"]),
])
def test_truncated_or_broken_json_gets_a_readable_message(http, raw, words):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    msg = error_of(r)
    assert all(w in msg for w in words), msg


# --- (1) bounded work per request -----------------------------------------------------------------
def test_body_limit_follows_the_context(model):
    assert body_limit(2048) < body_limit(131072) < 16 << 20
    app = build_app(model)
    limit = body_limit(CONTEXT)
    big = b'{"prompt": "' + b"a" * limit + b'"}'
    r = asgi(app, lambda c: c.post("/v1/completions", content=big, headers={"content-type": "application/json"}))
    assert r.status_code == 413 and "context" in error_of(r)


def test_list_bounds_are_checked_by_the_schema(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 5000})
    assert r.status_code == 400 and "messages" in error_of(r)
    r = http.post("/v1/completions", json={"prompt": "x", "stop": ["a"] * 17})
    assert r.status_code == 400 and "stop" in error_of(r)


def test_length_is_checked_before_the_vocabulary(http):
    # over the context AND out of the vocabulary: the cheap length check answers first
    r = http.post("/v1/completions", json={"prompt": [10**9] * (CONTEXT + 10)})
    assert r.status_code == 400 and "context length" in error_of(r), error_of(r)
    r = http.post("/v1/completions", json={"prompt": [10**9] * 4})
    assert r.status_code == 400 and "vocabulary" in error_of(r)


def test_a_large_body_is_prepared_off_the_event_loop_and_served(http, server):
    # a prompt as text padded past the off-loop threshold (tokenized on a worker thread)
    prompt = "hello " * 20 + " " * (80 << 10)
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code in (200, 400), r.text     # a long text may not fit 256 tokens: either way no 5xx
    r = http.post("/v1/completions", json={"prompt": [5] * 100, "max_tokens": 2, "ignore_eos": True,
                                           "user": "x" * (80 << 10)})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# --- (5) defaults that bound a request's work -------------------------------------------------------
def test_default_max_tokens_is_bounded(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5      # default_max_tokens=5
    # completions default to OpenAI's 16, clipped to the context left (vLLM's rule), never a 400
    r = http.post("/v1/completions", json={"prompt": [5] * (CONTEXT - 3), "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_n_is_bounded(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "n": 9})
    assert r.status_code == 400 and "n=9" in error_of(r)
    r = http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1, "n": 3})
    assert r.status_code == 400 and "choices" in error_of(r)


def test_default_queue_cap_follows_the_slo():
    assert default_max_pending(256, 1.0, 0.05) == 512          # a 1 s TTFT: one batch waiting
    assert default_max_pending(256, 8.0, 0.05) == 256 * 6      # a loose TTFT: more may wait
    assert default_max_pending(8, 0.1, 0.05) == 16


# --- (6) security -----------------------------------------------------------------------------------
def test_api_key_guards_v1_and_optionally_the_operator_endpoints(model):
    app = build_app(model, api_key="s3cret")

    async def calls(c):
        return [await c.get("/v1/models"), await c.get("/v1/models", headers={"Authorization": "Bearer nope"}),
                await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}),
                await c.post("/v1/completions", json={"prompt": "x"}), await c.get("/metrics"),
                await c.options("/v1/models")]

    no_key, wrong, right, post, metrics, options = asgi(app, calls)
    assert no_key.status_code == wrong.status_code == post.status_code == 401
    assert no_key.headers["www-authenticate"] == "Bearer" and no_key.json()["error"]["code"] == 401
    assert right.status_code == 200 and metrics.status_code == 200
    assert options.status_code != 401

    admin = build_app(model, api_key="s3cret", protect_admin=True)

    async def admin_calls(c):
        return [await c.get(p) for p in ("/metrics", "/load", "/profile")] + [await c.get("/health")]

    *guarded, health = asgi(admin, admin_calls)
    assert all(r.status_code == 401 for r in guarded)
    assert health.status_code != 401


def test_api_key_from_the_environment(monkeypatch):
    from fairbatch.server.access import API_KEY_ENV, api_key_from

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from(None) == "from-env"
    assert api_key_from("given") == "given"
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key_from(None) is None


def test_loopback_server_rejects_foreign_host_headers(model):
    app = build_app(model, loopback_only=True)

    async def calls(c):
        out = {}
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "evil.example:8000", "10.0.0.1", "localhost.evil"):
            out[host] = (await c.get("/v1/models", headers={"Host": host})).status_code
        return out

    codes = asgi(app, calls)
    assert codes["127.0.0.1:8000"] == codes["localhost"] == codes["[::1]:8000"] == 200
    assert codes["evil.example:8000"] == codes["10.0.0.1"] == codes["localhost.evil"] == 421


def test_models_shows_a_directory_by_its_name(tmp_path):
    d = tmp_path / "secret-place" / "My-Model-7B"
    d.mkdir(parents=True)
    assert public_name(str(d)) == "My-Model-7B"
    assert public_name("tiny-llama") == "tiny-llama"


def test_a_body_with_too_many_values_is_refused_before_the_event_loop_parses_it(http):
    from fairbatch.server.body_precheck import DEFAULT_MIN_BYTES
    from fairbatch.server.json_values import max_json_values

    n = DEFAULT_MIN_BYTES                      # "1," per id: twice the size that goes to the helper
    r = http.post("/v1/completions", content=b'{"prompt": [' + b"1," * n + b'1]}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and f"more than {max_json_values(CONTEXT)} JSON values" in error_of(r)
    cut = b'{"prompt": [' + b"1," * n                                  # large and truncated
    r = http.post("/v1/completions", content=cut, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "cut short" in error_of(r)
    ok = json.dumps({"prompt": [5] * 100, "max_tokens": 2, "ignore_eos": True, "user": "u" * n}).encode()
    r = http.post("/v1/completions", content=ok, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text        # large in bytes, few values: served


def test_a_text_far_over_the_context_is_not_tokenized_whole(http, model, monkeypatch):
    seen: list[int] = []
    encode = model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode", lambda text: seen.append(len(text)) or encode(text))
    text = "word " * 200_000                   # 1 MB of text for a 256-token context
    r = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and "context length" in error_of(r)
    assert seen and max(seen) <= CONTEXT * model.PROBE_CHARS_PER_TOKEN


def test_the_body_check_helper_is_replaced_when_it_dies(model):
    from fairbatch.server.body_precheck import DEFAULT_MIN_BYTES, LargeBodyCheck

    app = build_app(model)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        check = app.middleware_stack
        while not isinstance(check, LargeBodyCheck):       # find the middleware in the stack
            check = check.app
        many = b'{"prompt": [' + b"1," * DEFAULT_MIN_BYTES + b'1]}'
        post = lambda: http.post("/v1/completions", content=many, headers={"content-type": "application/json"})  # noqa: E731
        assert post().status_code == 400
        for p in list(check._pool._processes.values()):    # kill the helper
            p.kill()
            p.join()
        r = post()
        assert r.status_code == 400 and "JSON values" in error_of(r)
