"""vLLM's utility endpoints: /tokenize, /detokenize, /version, /ping, shaped as vLLM
answers them; and `fairbatch --version` / `fairbatch.__version__`."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

import fairbatch  # noqa: E402
from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402


@pytest.fixture(scope="module")
def http():
    model = load_served_model("tiny-llama", load_format="dummy", cpu_threads=1)
    with ServerThread(build_app(model)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        c.model = model
        yield c


def test_tokenize_prompt_and_chat(http):
    r = http.post("/tokenize", json={"prompt": "Hi!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == http.model.encode("Hi!") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == http.model.max_model_len and body["token_strs"] is None
    strs = http.post("/tokenize", json={"prompt": "Hi!", "return_token_strs": True}).json()["token_strs"]
    assert len(strs) == body["count"]
    # the chat form counts what /v1/chat/completions would send: its usage agrees
    msgs = [{"role": "user", "content": "hello"}]
    n = http.post("/tokenize", json={"messages": msgs}).json()["count"]
    usage = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).json()["usage"]
    assert n == usage["prompt_tokens"]


def test_detokenize_round_trip_and_errors(http):
    ids = http.post("/tokenize", json={"prompt": "round trip", "add_special_tokens": False}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "round trip"}
    for path, body in (("/detokenize", {"tokens": [10 ** 9]}), ("/detokenize", {"tokens": "x"}),
                       ("/tokenize", {}), ("/tokenize", {"prompt": 5})):
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, body, r.text)
    assert http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404


def test_version_and_ping(http):
    assert http.get("/version").json() == {"version": fairbatch.__version__}
    for method in ("GET", "POST"):
        r = http.request(method, "/ping")
        assert r.status_code == 200 and r.content == b""


def test_package_version_everywhere():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert fairbatch.__version__ == meta["project"]["version"]
    out = subprocess.run([sys.executable, "-m", "fairbatch.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == fairbatch.__version__


def test_import_stays_light():
    # the package and the scheduler core never pull torch (the simulator and routers run without it)
    code = ("import sys, fairbatch, fairbatch.scheduler; from fairbatch import SamplingParams, SLO; "
            "assert 'torch' not in sys.modules, 'torch imported'; from fairbatch import LLM; "
            "assert LLM.__name__ == 'LLM'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
