"""/metrics under vLLM's names (``metrics_prefix="vllm"``, `fairbatch serve
--metrics-prefix vllm`): the per-request phase histograms, token-count histograms,
iteration_tokens_total and cache_config_info that vLLM dashboards read, with values
that agree with the requests served."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402
from support import metric, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def served():
    model = load_served_model("tiny-llama", load_format="dummy", cpu_threads=1, num_kv_blocks=200)
    app = build_app(model, metrics_prefix="vllm")
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        yield c, app


def test_vllm_named_request_metrics(served):
    http, app = served
    prompts = [[5] * 7, [6] * 11, [7] * 3]
    for p in prompts:
        r = http.post("/v1/completions", json={"prompt": p, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200
    text = http.get("/metrics").text
    n = len(prompts)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens",
                 "request_num_preemptions"):
        assert metric(text, f"vllm:{name}_count") == n, name
    assert metric(text, "vllm:request_prompt_tokens_sum") == sum(map(len, prompts))
    assert metric(text, "vllm:request_generation_tokens_sum") == 4 * n
    assert metric(text, "vllm:request_success_total", finished_reason="length") == n
    assert metric(text, "vllm:request_params_n_count") == n and metric(text, "vllm:request_params_n_sum") == n
    assert metric(text, "vllm:request_max_num_generation_tokens_sum") == 4 * n
    # phases add up: queue + prefill = TTFT, per request and so in sum
    q, pf = metric(text, "vllm:request_queue_time_seconds_sum"), metric(text, "vllm:request_prefill_time_seconds_sum")
    assert q + pf == pytest.approx(metric(text, "vllm:time_to_first_token_seconds_sum"), rel=1e-6, abs=1e-9)
    assert not any(line.startswith("fairbatch:") for line in text.splitlines())
    # prefix caching (on by default): every prompt token is looked up at admission; these
    # prompts have no full block, so none is found. The engine's snapshot may lag the answers.
    wait_for(lambda: metric(t := http.get("/metrics").text, "vllm:prefix_cache_queries_total")
             == metric(t, "vllm:prompt_tokens_total") > 0, "the prefix-cache counters")
    assert "vllm:prefix_cache_hits_total{" in text and metric(text, "vllm:prefix_cache_hits_total") == 0


def test_iteration_tokens_and_cache_config(served):
    http, app = served
    http.post("/v1/completions", json={"prompt": [9] * 5, "max_tokens": 2, "ignore_eos": True})

    def scraped():
        t = http.get("/metrics").text
        return t if metric(t, "vllm:iteration_tokens_total_count") == metric(t, "vllm:engine_steps_total") > 0 else None

    wait_for(lambda: scraped() is not None, "iteration_tokens_total to count every step")
    text = scraped()
    assert metric(text, "vllm:iteration_tokens_total_sum") == metric(text, "vllm:engine_step_tokens_total")
    # buckets are cumulative: +Inf holds every step
    assert metric(text, "vllm:iteration_tokens_total_bucket", le="+Inf") == metric(
        text, "vllm:iteration_tokens_total_count")
    assert metric(text, "vllm:cache_config_info", num_gpu_blocks="200", block_size="16") == 1


def test_bad_prefix_is_refused():
    from fairbatch.server.metrics import ServerMetrics

    with pytest.raises(ValueError, match="prefix"):
        ServerMetrics("m", prefix="vllm:")


def test_n_counts_per_prompt_as_vllm(served):
    http, _ = served
    before = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": [[5, 6, 7], [8, 9]], "n": 2, "max_tokens": 3,
                                            "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    after = http.get("/metrics").text
    grew = lambda name: metric(after, name) - metric(before, name)
    assert grew("vllm:request_params_n_count") == 2 and grew("vllm:request_params_n_sum") == 4
    assert grew("vllm:request_max_num_generation_tokens_sum") == 6
