"""Model/GPU presets, the roofline and linear step-time models, and profile loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from fairbatch.latency import (LinearLatencyModel, RooflineLatencyModel, latency_model_from_dict,
                               load_latency_model)
from fairbatch.latency import profiles
from fairbatch.plan import StepFeatures
from fairbatch.specs import (ModelSpec, get_gpu, get_model, gpu_names, gpu_preset_for, kv_cache_blocks,
                             model_names)


# --- specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, total", [
    ("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496), ("llama-2-7b", 6_738_415_616),
    ("qwen2.5-7b", 7_615_616_512), ("mistral-7b", 7_248_023_552), ("qwen3-8b", 8_190_735_360),
])
def test_param_counts_match_published_totals(name: str, total: int) -> None:
    # totals are HF num_parameters() of the real checkpoints (checked against transformers)
    assert get_model(name).num_params == total


def test_derived_sizes() -> None:
    m = get_model("llama-3-8b")
    assert round(m.weight_bytes / 1e9, 2) == 16.06                       # bf16 Llama-3-8B
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert m.attn_flops_per_pair == 4 * 32 * 32 * 128
    assert m.flops_per_token == m.layer_flops_per_token + 2 * 128256 * 4096
    assert abs(m.flops_per_token / (2 * (m.num_params - m.embedding_params)) - 1) < 1e-3
    tied = get_model("tiny-qwen3")
    assert tied.tie_word_embeddings and tied.streamed_weight_bytes == tied.weight_bytes


@pytest.mark.parametrize("name", model_names())
def test_hf_config_round_trip(name: str) -> None:
    m = get_model(name)
    d = json.loads(json.dumps(m.to_hf_config()))
    assert ModelSpec.from_hf_config(d, name) == m
    assert d["architectures"][0].lower().startswith(m.family)


def test_from_hf_config_of_published_json() -> None:
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
           "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 4096,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}          # Mistral-7B-v0.1
    m = ModelSpec.from_hf_config(cfg, "mistral-7b-v0.1")
    assert m.head_dim == 128 and m.num_params == 7_241_732_096
    assert m.max_position_embeddings == 4096      # served within the sliding window
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        ModelSpec.from_hf_config({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "x")
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        ModelSpec.from_hf_config({k: v for k, v in cfg.items() if k != "hidden_size"}, "x")


def test_unknown_presets() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'; choose from .*llama-3-8b"):
        get_model("gpt-5")
    with pytest.raises(ValueError, match="unknown GPU preset 'b200'; choose from .*h100"):
        get_gpu("b200")
    assert {"h100", "h200", "a100"} <= set(gpu_names())
    assert {"tiny-llama", "tiny-qwen3", "llama-3-8b"} <= set(model_names())


def test_kv_cache_blocks() -> None:
    m, h100 = get_model("llama-3-8b"), get_gpu("h100")
    blocks = kv_cache_blocks(m, h100)
    assert 20_000 < blocks < 40_000
    assert kv_cache_blocks(m, get_gpu("h200")) > 1.8 * blocks
    assert kv_cache_blocks(m, h100, gpu_memory_utilization=0.5) < blocks
    assert kv_cache_blocks(m, h100, block_size=32) == pytest.approx(blocks / 2, abs=1)
    assert kv_cache_blocks(m, h100, activation_reserve_bytes=0) > blocks
    with pytest.raises(ValueError, match="llama-3-70b weights .* do not fit"):
        kv_cache_blocks(get_model("llama-3-70b"), h100)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_blocks(m, h100, gpu_memory_utilization=1.5)


def test_engine_sizes_the_cache_as_the_simulator() -> None:
    """One sizing: the engine passes the device's memory, what is resident and what is free;
    with the preset's numbers it gets the simulator's count (pinned: results depend on it)."""
    m, h100 = get_model("llama-3-8b"), get_gpu("h100")
    assert kv_cache_blocks(m, h100) == 28231
    assert kv_cache_blocks(m, h100.memory_bytes, resident_bytes=m.weight_bytes) == 28231
    assert kv_cache_blocks(m, h100.memory_bytes, free_bytes=40 * 10**9) < 28231   # others' memory
    with pytest.raises(ValueError, match="do not fit"):
        kv_cache_blocks(m, h100.memory_bytes, free_bytes=10**9)


@pytest.mark.parametrize("device, preset", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_preset_for(device: str, preset: str | None) -> None:
    assert gpu_preset_for(device) == preset


# --- roofline ------------------------------------------------------------------------------

def decode_batch(n: int, ctx: int) -> StepFeatures:
    f = StepFeatures()
    for _ in range(n):
        f.add(ctx - 1, 1)
    return f


def test_shipped_profile_is_the_default_where_it_exists() -> None:
    m = load_latency_model("llama-3-8b", "h100")
    assert m.kind == "linear" and m.meta["model"] == "llama-3-8b" and m.meta["gpu"] == "h100"
    h200 = load_latency_model("llama-3-8b", "h200")      # a served refit until an H200 sweep
    assert h200.kind == "linear" and h200.meta["gpu"] == "h200"
    assert isinstance(load_latency_model("llama-3-8b", "a100"), RooflineLatencyModel)   # none measured


def test_roofline_sanity_llama3_8b_h100() -> None:
    m = RooflineLatencyModel(get_model("llama-3-8b"), get_gpu("h100"))
    t1, t128 = m.predict(decode_batch(1, 2048)), m.predict(decode_batch(128, 2048))
    assert t1 >= 5.4e-3          # 15 GB of streamed weights at 3.0 TB/s, plus overhead
    assert 1.5 * t1 < t128 < 25e-3
    assert 1_500 <= m.max_tokens_in(0.05, context=1024) <= 4_000      # Sarathi's budget at 50 ms
    prefill = StepFeatures()
    prefill.add(0, 4096)
    assert prefill.new_tokens * get_model("llama-3-8b").flops_per_token / 780e12 < m.predict(prefill)


def test_roofline_monotone_in_tokens_and_context() -> None:
    m = RooflineLatencyModel(get_model("qwen2.5-7b"), get_gpu("a100"))
    base = decode_batch(16, 1000)
    by_tokens = [m.predict(base.with_chunk(500, k)) for k in range(0, 5000, 37)]
    by_context = [m.predict(base.with_chunk(c, 64)) for c in range(0, 30000, 997)]
    assert by_tokens == sorted(by_tokens) and by_context == sorted(by_context)
    assert by_tokens[-1] > by_tokens[0] and by_context[-1] > by_context[0]


def brute_max_chunk(m: RooflineLatencyModel, base: StepFeatures, cached: int, limit: int, budget: float) -> int:
    best = 0
    for k in range(1, limit + 1):
        if m.predict(base.with_chunk(cached, k)) > budget:
            break
        best = k
    return best


@settings(max_examples=80, deadline=None)
@given(model=st.sampled_from(["llama-3-8b", "qwen3-8b", "llama-2-7b", "tiny-llama"]),
       gpu=st.sampled_from(["h100", "h200", "a100"]),
       decodes=st.integers(0, 64), ctx=st.integers(1, 8000),
       prefills=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 512)), max_size=3),
       cached=st.integers(0, 8000), limit=st.integers(0, 1500), budget=st.floats(1e-4, 0.15))
def test_roofline_max_chunk_exact(model: str, gpu: str, decodes: int, ctx: int,
                                  prefills: list[tuple[int, int]], cached: int, limit: int, budget: float) -> None:
    m = RooflineLatencyModel(get_model(model), get_gpu(gpu))
    base = decode_batch(decodes, ctx)
    for c, k in prefills:
        base.add(c, k)
    assert m.max_chunk(base, cached, limit, budget) == brute_max_chunk(m, base, cached, limit, budget)


def test_roofline_max_chunk_at_boundaries() -> None:
    m = RooflineLatencyModel(get_model("llama-3-8b"), get_gpu("h100"))
    base = decode_batch(8, 512)
    for k in (1, 2, 100, 1000, 2048):
        t = m.predict(base.with_chunk(300, k))
        assert m.max_chunk(base, 300, 4096, t) == k                 # exactly at a budget
        assert m.max_chunk(base, 300, 4096, t * (1 - 1e-12)) == k - 1
    assert m.max_chunk(base, 300, 0, 1.0) == 0
    assert m.max_chunk(base, 300, 4096, 1e-6) == 0
    assert m.max_chunk(base, 300, 4096, 1e9) == 4096


def test_roofline_dict_round_trip() -> None:
    m = RooflineLatencyModel(get_model("tiny-qwen3"), get_gpu("h200"), overhead_s=1e-3, per_seq_s=2e-6)
    again = latency_model_from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    by_name = RooflineLatencyModel.from_dict({"kind": "roofline", "model": "llama-3-8b", "gpu": "h100"})
    direct = RooflineLatencyModel(get_model("llama-3-8b"), get_gpu("h100"))
    assert by_name.predict(decode_batch(4, 100)) == direct.predict(decode_batch(4, 100))


# --- linear model --------------------------------------------------------------------------

TRUE = (4e-3, 2e-5, 3e-8, 2e-10, 1e-5)


def synthetic_samples(n: int, noise: float, seed: int = 0) -> list[tuple[StepFeatures, float]]:
    rng = random.Random(seed)
    truth = LinearLatencyModel(*TRUE)
    out = []
    for _ in range(n):
        f = decode_batch(rng.randint(1, 256), rng.randint(16, 8000))
        if rng.random() < 0.6:
            f.add(rng.randint(0, 6000), rng.randint(16, 4096))
        out.append((f, truth.predict(f) * (1 + rng.gauss(0, noise))))
    return out


def test_linear_fit_recovers_coefficients_noiseless() -> None:
    fit = LinearLatencyModel.fit(synthetic_samples(200, 0.0))
    for got, want in zip((fit.a, fit.b, fit.c, fit.d, fit.e), TRUE):
        assert got == pytest.approx(want, rel=1e-4)


def test_linear_fit_noisy(tmp_path: Path) -> None:
    samples = synthetic_samples(600, 0.01, seed=1)
    fit = LinearLatencyModel.fit(samples, meta={"model": "synthetic"})
    assert fit.a == pytest.approx(TRUE[0], rel=0.05) and fit.b == pytest.approx(TRUE[1], rel=0.05)
    assert fit.relative_errors(synthetic_samples(200, 0.0, seed=2)).max() < 0.02
    path = tmp_path / "p.json"
    fit.save(path)
    loaded = load_latency_model(profile=path)
    assert isinstance(loaded, LinearLatencyModel) and loaded == LinearLatencyModel.load(path)
    assert (loaded.a, loaded.b, loaded.c, loaded.d, loaded.e) == (fit.a, fit.b, fit.c, fit.d, fit.e)
    assert loaded.meta == {"model": "synthetic", "num_samples": 600}


# --- profile selection ---------------------------------------------------------------------

def test_load_latency_model_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_latency_model("tiny-llama", "a100"), RooflineLatencyModel)
    with pytest.raises(ValueError, match="unknown model preset"):
        load_latency_model("nope", "h100")
    roof = tmp_path / "roof.json"
    roof.write_text(json.dumps(RooflineLatencyModel(get_model("qwen3-8b"), get_gpu("h200")).to_dict()))
    assert load_latency_model("ignored", "ignored", profile=roof).model.name == "qwen3-8b"  # type: ignore[attr-defined]
    # a shipped profile wins over the roofline
    shipped = tmp_path / "llama-3-8b_h100.json"
    LinearLatencyModel(5e-3, 1e-5).save(shipped)
    monkeypatch.setattr(profiles, "shipped_profile", lambda model, gpu: shipped if (model, gpu) == ("llama-3-8b", "h100") else None)
    assert isinstance(load_latency_model(), LinearLatencyModel)
    assert isinstance(load_latency_model("llama-3-8b", "h200"), RooflineLatencyModel)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"kind": "linear"}', "malformed"),
    ('{"kind": "linear", "coefficients": {"intercept": "x"}}', "malformed"),
    ('{"kind": "cubic"}', "unknown latency model kind 'cubic'"),
    ('[1, 2]', "must be a JSON object"),
    ('{"kind": "roofline", "model": "gpt-5", "gpu": "h100"}', "unknown model preset"),
])
def test_malformed_profile(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_latency_model(profile=p)


def test_missing_profile(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="latency profile not found"):
        load_latency_model(profile=tmp_path / "absent.json")
