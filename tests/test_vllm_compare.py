"""Our server and vLLM's, same model directory (a tiny Llama config with dummy weights,
one byte-level BPE tokenizer), same requests: the same fields, the same shapes, the same
kind of answer (200 or 400). Values differ (each draws its own random weights); what is
compared is what a vLLM client reads.

Runs where vLLM is at hand, since its CPU server takes a minute or two to start: under
the python of the venv ``bash ci/vllm-setup.sh`` makes (``VENV/bin/python -m pytest
tests/test_vllm_compare.py``, beside the plugin tests), or from any venv with
``FAIRBATCH_VLLM_PYTHON`` set to that python. Skipped otherwise (the default run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("FAIRBATCH_VLLM_PYTHON")
if not VLLM_PYTHON and importlib.util.find_spec("vllm") is not None:
    VLLM_PYTHON = sys.executable          # running inside vLLM's venv
if not VLLM_PYTHON or not Path(VLLM_PYTHON).expanduser().exists():
    pytest.skip("no vLLM: run under its venv's python or set FAIRBATCH_VLLM_PYTHON", allow_module_level=True)
pytest.importorskip("tokenizers")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from support import TINY_LLAMA_CONFIG, free_port, stop_process, wait_healthy  # noqa: E402

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# ids, timestamps and fields only one server has
VOLATILE = {"id", "created", "model", "system_fingerprint", "service_tier", "kv_transfer_params",
            "prompt_token_ids", "token_ids", "reasoning_content", "reasoning", "annotations", "audio",
            "function_call", "tool_calls", "refusal", "prompt_tokens_details", "completion_tokens_details"}


def make_model_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    (path / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world, how are you today? fine thanks, and you?"] * 20, trainer)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE, "add_bos_token": False}))
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("model"))
    port = free_port()
    log = d / "vllm.log"
    cmd = [str(Path(VLLM_PYTHON).expanduser()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(d),
           "--served-model-name", "m", "--load-format", "dummy", "--enforce-eager", "--max-model-len", "512",
           "--dtype", "float32", "--kv-cache-memory-bytes", str(32 << 20), "--max-num-batched-tokens", "512",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    base = f"http://127.0.0.1:{port}"
    model = load_served_model(str(d), load_format="dummy", cpu_threads=1, served_model_name="m", max_model_len=512)
    try:
        wait_healthy(proc, base, log, 300, what="vLLM")
        with ServerThread(build_app(model, metrics_prefix="vllm")) as ours, \
                httpx.Client(base_url=base, timeout=120) as theirs_c, \
                httpx.Client(base_url=ours.url, timeout=120) as ours_c:
            ours_c.model_id = model.name
            ours_c.model_dir = str(d)
            theirs_c.model_id = "m"
            yield theirs_c, ours_c
    finally:
        stop_process(proc)


def shape(x):
    """Types and lengths, not values."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [shape(v) for v in x]
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


def assert_same_fields(theirs, ours, where="$"):
    """Every field vLLM answers with a value, ours has, with the same shape (a dict keyed
    by token text or token id may have other keys: compared by size)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        keyed_by_data = all(k.lstrip("-").isdigit() for k in theirs) or where.endswith("top_logprobs[]")
        if keyed_by_data:
            assert 0 < len(ours) <= max(len(theirs), 1) + 1 if theirs else True, where
            return
        for k, v in theirs.items():
            if v is None or v == "NoneType":
                continue
            assert k in ours, f"{where}.{k} missing in ours"
            assert_same_fields(v, ours[k], f"{where}.{k}")
    elif isinstance(theirs, list) and isinstance(ours, list):
        if where.endswith(".bytes"):          # a token's UTF-8 bytes: its length is the token's
            assert set(theirs) <= {"number"} and set(ours) <= {"number"}, where
            return
        assert len(theirs) == len(ours), f"{where}: {len(theirs)} vs {len(ours)} items"
        for i, (a, b) in enumerate(zip(theirs, ours)):
            assert_same_fields(a, b, f"{where}[]")
    else:
        assert theirs == ours, f"{where}: {theirs} vs {ours}"


def both(servers, method, path, body=None):
    out = []
    for c in servers:
        b = None if body is None else {**body, **({"model": c.model_id} if "model" in body else {})}
        out.append(c.request(method, path, json=b))
    return out


@pytest.mark.parametrize("body", [
    {"prompt": "hello world", "max_tokens": 4, "ignore_eos": True, "temperature": 0},
    {"prompt": "hello world", "max_tokens": 4, "ignore_eos": True, "temperature": 0, "logprobs": 2},
    {"prompt": "hello world", "max_tokens": 3, "ignore_eos": True, "temperature": 0, "logprobs": 1, "echo": True},
    {"prompt": "hello world", "max_tokens": 2, "ignore_eos": True, "temperature": 0, "prompt_logprobs": 1},
    {"prompt": "hello", "max_tokens": 5, "ignore_eos": True, "min_tokens": 2, "repetition_penalty": 1.2,
     "presence_penalty": 0.5, "frequency_penalty": 0.5, "min_p": 0.1, "allowed_token_ids": [40, 41, 42],
     "logit_bias": {"41": 3}},
])
def test_completions_same_fields(servers, body):
    theirs, ours = both(servers, "POST", "/v1/completions", {**body, "model": "m"})
    assert theirs.status_code == ours.status_code == 200, (theirs.text, ours.text)
    assert_same_fields(shape(theirs.json()), shape(ours.json()))


@pytest.mark.parametrize("body", [
    {"max_tokens": 3, "ignore_eos": True, "temperature": 0},
    {"max_tokens": 3, "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 2},
])
def test_chat_same_fields(servers, body):
    msgs = [{"role": "user", "content": "hello world"}]
    theirs, ours = both(servers, "POST", "/v1/chat/completions", {**body, "messages": msgs, "model": "m"})
    assert theirs.status_code == ours.status_code == 200, (theirs.text, ours.text)
    assert_same_fields(shape(theirs.json()), shape(ours.json()))


def test_stop_reason_same(servers):
    body = {"prompt": "hi", "max_tokens": 8, "temperature": 0, "allowed_token_ids": [40, 41],
            "logit_bias": {"41": 100}, "stop_token_ids": [41], "model": "m"}
    theirs, ours = both(servers, "POST", "/v1/completions", body)
    a, b = theirs.json()["choices"][0], ours.json()["choices"][0]
    assert (a["finish_reason"], a["stop_reason"], a["text"]) == (b["finish_reason"], b["stop_reason"], b["text"]) \
        == ("stop", 41, "")


@pytest.mark.parametrize("bad", [{"repetition_penalty": -5}, {"min_p": 2}, {"logprobs": 21},
                                 {"min_tokens": 9, "max_tokens": 2}, {"prompt_logprobs": 21},
                                 {"stream_options": {"include_usage": True}}])
def test_same_refusals(servers, bad):
    body = {"prompt": "hi", "max_tokens": 2, "model": "m", **bad}
    theirs, ours = both(servers, "POST", "/v1/completions", body)
    assert theirs.status_code == ours.status_code == 400, (bad, theirs.text, ours.text)


def test_utility_endpoints_same_fields(servers):
    for method, path, body in (("POST", "/tokenize", {"prompt": "hello world"}),
                               ("POST", "/tokenize", {"prompt": "hello", "return_token_strs": True}),
                               ("POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("POST", "/detokenize", {"tokens": [40, 41, 42]}),
                               ("GET", "/version", None)):
        theirs, ours = both(servers, method, path, body)
        assert theirs.status_code == ours.status_code == 200, (path, theirs.text, ours.text)
        if path != "/version":
            assert theirs.json() == ours.json(), path        # same tokenizer: same answer
        assert set(theirs.json()) == set(ours.json())
    theirs, ours = both(servers, "GET", "/ping")
    assert theirs.status_code == ours.status_code == 200


def test_metric_names_are_vllms(servers):
    theirs, ours = both(servers, "GET", "/metrics")
    names = lambda t: {ln.split("{")[0].split(" ")[0] for ln in t.splitlines() if ln.startswith("vllm:")}
    wanted = {"vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
              "vllm:request_decode_time_seconds_sum", "vllm:request_prompt_tokens_sum",
              "vllm:request_generation_tokens_sum", "vllm:iteration_tokens_total_sum", "vllm:cache_config_info",
              "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_sum",
              "vllm:e2e_request_latency_seconds_sum", "vllm:request_success_total", "vllm:num_preemptions_total",
              "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_params_n_sum",
              "vllm:request_max_num_generation_tokens_sum", "vllm:request_params_max_tokens_sum",
              "vllm:request_inference_time_seconds_sum", "vllm:request_num_preemptions_sum"}
    assert wanted <= names(theirs.text)
    assert wanted <= names(ours.text)


def _events(client, path, body) -> list[dict]:
    out = []
    with client.stream("POST", path, json={**body, "model": client.model_id, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                              "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
                              "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 1}),
    ("/v1/completions", {"prompt": "hello world", "max_tokens": 3, "ignore_eos": True, "temperature": 0,
                         "echo": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "hello world", "max_tokens": 2, "ignore_eos": True, "temperature": 0,
                         "logprobs": 1}),
])
def test_streams_same_chunks(servers, path, body):
    """Chunk by chunk: the first chunk (a chat stream's role, a completion's echo), the
    token chunks, the finishing one and the usage one carry the same fields. vLLM may pack
    several tokens into one chunk when its loop falls behind, so chunks are compared by
    their fields, not counted."""
    theirs, ours = (_events(c, path, body) for c in servers)

    def fields(x):
        if isinstance(x, dict):      # dicts keyed by token text or id: their type only
            return {k: type(v).__name__ if k in ("top_logprobs", "prompt_logprobs") else fields(v)
                    for k, v in x.items() if k not in VOLATILE and v is not None}
        if isinstance(x, list):
            return [fields(x[0])] if x and not isinstance(x[0], (int, float)) else "list"
        return shape(x)

    def kinds(events):
        """first chunk, token chunks, finishing chunk, usage chunk"""
        with_choices = [e for e in events if e.get("choices")]
        finishing = [e for e in with_choices if e["choices"][0].get("finish_reason")]
        usage = [e for e in events if not e.get("choices")]
        return ([fields(with_choices[0])], [fields(e) for e in with_choices[1:-1]][:1],
                [fields(finishing[-1])] if finishing else [], [fields(e) for e in usage])

    for t, o in zip(kinds(theirs), kinds(ours)):
        assert t == o or not t, (t, o)
    if "chat" in path:
        assert theirs[0]["choices"][0]["delta"].get("role") == ours[0]["choices"][0]["delta"].get("role") \
            == "assistant"


VLLM_BENCH = ("import argparse, sys\n"
              "from vllm.benchmarks.serve import add_cli_args, main\n"
              "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")


def test_bench_is_a_drop_in_for_vllm_bench_serve(servers, tmp_path):
    """`vllm bench serve` and `fairbatch bench`, the same flags, against our server: the
    same result block lines (ours adds an SLO section) and every key of vLLM's JSON."""
    from typer.testing import CliRunner

    from fairbatch.cli import app as cli

    _, ours = servers
    tokenizer = ours.model_dir
    flags = ["--base-url", str(ours.base_url).rstrip("/"), "--model", "m", "--dataset-name", "random",
             "--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "6", "--request-rate", "20",
             "--ignore-eos", "--goodput", "ttft:60000", "--percentile-metrics", "ttft,tpot,itl",
             "--metric-percentiles", "99", "--save-result", "--result-filename", "r.json"]
    theirs = subprocess.run([str(Path(VLLM_PYTHON).expanduser()), "-c", VLLM_BENCH, *flags, "--tokenizer", tokenizer,
                             "--result-dir", str(tmp_path / "vllm")], capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stdout[-3000:] + theirs.stderr[-3000:]
    r = CliRunner().invoke(cli, ["bench", *flags, "--result-dir", str(tmp_path / "fb")])
    assert r.exit_code == 0, r.output

    def block(text: str) -> list[str]:
        lines = text.splitlines()
        start = next(i for i, ln in enumerate(lines) if "Serving Benchmark Result" in ln)
        return [ln[:40].rstrip() for ln in lines[start:] if ln.strip()]

    v_lines, f_lines = block(theirs.stdout), block(r.output)
    slo = f_lines.index(next(ln for ln in f_lines if "SLO Attainment" in ln))
    assert f_lines[:slo] == v_lines[:slo]
    v = json.loads((tmp_path / "vllm" / "r.json").read_text())
    f = json.loads((tmp_path / "fb" / "r.json").read_text())
    assert set(v) - set(f) <= {"rtfx"}                   # an ASR-only metric
    assert f["request_rate"] == v["request_rate"] == 20.0 and f["completed"] == v["completed"] == 6
