"""``--load-format simulated``: no model runs, steps last what the step-time model predicts,
tokens are synthetic; the scheduler, KV accounting and server are the real ones."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fairbatch.engine import LLM  # noqa: E402
from fairbatch.engine.params import SamplingParams  # noqa: E402
from fairbatch.engine.simulated import SIMULATED_DEVICE_PREFIX, SimulatedExecutor, synthetic_token  # noqa: E402
from fairbatch.server import ServerThread, build_app, load_served_model  # noqa: E402


class Recording(SimulatedExecutor):
    """Keeps each step's predicted and reported duration."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.steps_seen: list[tuple[float, float]] = []

    def execute(self, plan):
        result = super().execute(plan)
        self.steps_seen.append((self.model.predict(plan.features), result.duration))
        return result


def simulated_llm(**kw) -> LLM:
    return LLM("llama-3-8b", load_format="simulated", policy="fairbatching", num_kv_blocks=256, **kw)


def test_steps_last_at_least_the_prediction_and_tokens_are_synthetic():
    llm = simulated_llm()
    ex = Recording(llm.engine.executor.model)
    llm.engine.executor = llm.instance.executor = ex
    outs = llm.generate(["a prompt", "another prompt"], SamplingParams(max_tokens=6))
    expected = [synthetic_token(j) for j in range(6)]
    assert [o.outputs[0].token_ids for o in outs] == [expected, expected]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert ex.steps_seen and all(reported >= predicted > 0 for predicted, reported in ex.steps_seen)
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def test_executor_times_steps_with_the_schedulers_model():
    llm = simulated_llm()
    assert llm.engine.executor.model is llm.latency_model is llm.scheduler.latency


def test_kv_cache_defaults_to_the_simulated_gpus():
    from fairbatch.specs import default_activation_reserve, get_gpu, get_model, kv_cache_blocks

    llm = LLM("llama-3-8b", load_format="simulated")
    spec = get_model("llama-3-8b")
    reserve = default_activation_reserve(spec, 8192, 256)
    assert llm.engine.allocator.num_blocks == kv_cache_blocks(spec, get_gpu("h100"), activation_reserve_bytes=reserve)


def test_stop_token_ids_min_tokens_and_logprobs():
    llm = simulated_llm()
    stop = synthetic_token(2)
    out = llm.generate(["x"], SamplingParams(max_tokens=10, stop_token_ids=[stop], logprobs=2))[0].outputs[0]
    assert out.token_ids == [synthetic_token(j) for j in range(3)] and out.finish_reason == "stop"
    assert [next(iter(d)) for d in out.logprobs] == out.token_ids
    assert all(len(d) == 2 for d in out.logprobs)
    later = llm.generate(["x"], SamplingParams(max_tokens=10, stop_token_ids=[stop], min_tokens=4))[0].outputs[0]
    assert len(later.token_ids) > 4


def test_served_over_http_with_the_real_front_end():
    model = load_served_model("llama-3-8b", load_format="simulated", num_kv_blocks=256, ttft_slo=2.0, tpot_slo=0.5)
    assert model.device.startswith(SIMULATED_DEVICE_PREFIX)
    with ServerThread(build_app(model)) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5, "stream": False})
        assert r.status_code == 200
        body = r.json()
        assert body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["text"] == "".join(chr(synthetic_token(j)) for j in range(5))
        info = http.get("/v1/models").json()["data"][0]["fairbatch"]
        assert info["device"].startswith(SIMULATED_DEVICE_PREFIX)


def test_a_profile_names_the_simulated_gpu():
    from fairbatch.latency.profiles import load_latency_model

    h200 = load_latency_model("llama-3-8b", "h200")
    llm = LLM("llama-3-8b", load_format="simulated", latency_model=h200)
    plain = LLM("llama-3-8b", load_format="simulated")
    assert llm.engine.device == SIMULATED_DEVICE_PREFIX + "h200" and llm.engine.executor.model is h200
    assert llm.engine.allocator.num_blocks > plain.engine.allocator.num_blocks    # 141 GB vs 80 GB
