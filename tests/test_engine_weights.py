"""Model configs and weights: supported architectures, RoPE scaling, safetensors loading
(single file and sharded with an index), and one clear error for each way a checkpoint
can be wrong."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from test_engine_support import variant_config, write_checkpoint

from fairbatch.engine.config import ModelConfig, ModelConfigError
from fairbatch.engine.llm import Engine, EngineArgs, EngineError
from fairbatch.engine.model import CausalLM
from fairbatch.engine.rope import inv_frequencies
from fairbatch.engine.weights import init_dummy, load_safetensors
from fairbatch.specs import get_model, model_names


def test_config_families():
    q2 = ModelConfig.from_hf(variant_config("tiny-qwen2"))
    assert q2.attention_bias and not q2.o_bias                     # Qwen2 biases q/k/v only
    q3 = ModelConfig.from_hf(variant_config("tiny-qwen3"))
    assert q3.qk_norm and q3.tie_word_embeddings and not q3.attention_bias
    l31 = ModelConfig.from_hf(variant_config("tiny-llama31"))
    assert l31.attention_bias and l31.o_bias and l31.rope_type == "llama3"
    m = ModelConfig.from_hf({**variant_config("tiny-mistral"), "sliding_window": 1024})
    assert m.family == "mistral" and m.max_position_embeddings == 1024   # served within the window


@pytest.mark.parametrize("name", model_names())
def test_engine_config_is_the_preset_spec(name):
    """The engine builds exactly the architecture the simulator models: a preset's
    ``ModelConfig`` is its ``ModelSpec``, and so is the one parsed from its config.json."""
    spec = get_model(name)
    preset = ModelConfig.from_preset(name)
    assert preset.spec == spec
    assert ModelConfig.from_hf(spec.to_hf_config(), name=name).spec == spec
    model = CausalLM(preset, torch.float32, "meta")
    assert sum(p.numel() for p in model.parameters()) == spec.num_params


@pytest.mark.parametrize("variant", ["tiny-qwen2", "tiny-llama31", "tiny-mistral"])
def test_spec_counts_every_bias(variant):
    cfg = {**variant_config(variant), "mlp_bias": variant == "tiny-llama31"}
    model = CausalLM(ModelConfig.from_hf(cfg), torch.float32, "meta")
    assert sum(p.numel() for p in model.parameters()) == ModelConfig.from_hf(cfg).num_params


def test_transformers_v5_rope_parameters():
    cfg = variant_config("tiny-llama31")
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {"rope_theta": cfg["rope_theta"], **cfg["rope_scaling"]}
    a, b = ModelConfig.from_hf(cfg), ModelConfig.from_hf(v5)
    assert a.rope_theta == b.rope_theta and dict(a.rope_scaling) == dict(b.rope_scaling)


@pytest.mark.parametrize("name", ["tiny-llama31", "tiny-llama"])
def test_rope_frequencies_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg_dict = variant_config(name)
    ours = inv_frequencies(ModelConfig.from_hf(cfg_dict))
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures",)})
    rtype = hf_cfg.rope_parameters.get("rope_type", "default")
    if rtype == "default":
        dim = cfg_dict["head_dim"]
        ref = 1.0 / (cfg_dict["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rtype](hf_cfg, "cpu")
    assert torch.equal(ours, ref.float())


@pytest.mark.parametrize("bad,needle", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": None}, "'hidden_size'"),
])
def test_unsupported_configs_name_the_problem(bad, needle):
    cfg = {**variant_config("tiny-llama"), **bad}
    with pytest.raises(ModelConfigError, match=needle):
        ModelConfig.from_hf(cfg)


def test_sharded_checkpoint_loads_identically(tmp_path):
    single = write_checkpoint("tiny-llama", tmp_path / "one", seed=3)
    sharded = write_checkpoint("tiny-llama", tmp_path / "many", seed=3, max_shard_bytes=100_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    cfg = ModelConfig.from_dir(single)
    a, b = CausalLM(cfg, torch.float32, "cpu"), CausalLM(cfg, torch.float32, "cpu")
    load_safetensors(a, single)
    load_safetensors(b, sharded)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    # and in another dtype
    c = CausalLM(cfg, torch.bfloat16, "cpu")
    load_safetensors(c, sharded)
    assert torch.equal(c.model.norm.weight, a.model.norm.weight.bfloat16())


def _edit_checkpoint(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 64)}),
     r"'model.layers.0.self_attn.q_proj.weight' in model.safetensors has shape \(3, 64\)"),
    (lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(128, 64)}),
     "unexpected tensor 'model.layers.7.mlp.up_proj.weight'"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, edit, needle):
    path = write_checkpoint("tiny-llama", tmp_path / "ck")
    _edit_checkpoint(path, edit)
    with pytest.raises(EngineError, match=needle):
        Engine(EngineArgs(str(path), num_kv_blocks=8))


def test_missing_shard_and_missing_weights(tmp_path):
    path = write_checkpoint("tiny-llama", tmp_path / "ck", max_shard_bytes=100_000)
    victim = sorted(path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(EngineError, match=f"shard {victim.name} listed in model.safetensors.index.json is missing"):
        Engine(EngineArgs(str(path), num_kv_blocks=8))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(variant_config("tiny-llama")))
    with pytest.raises(EngineError, match="no \\*.safetensors weights"):
        Engine(EngineArgs(str(empty), num_kv_blocks=8))


def test_model_argument_errors(tmp_path):
    with pytest.raises(EngineError, match="preset without weights"):
        Engine(EngineArgs("tiny-llama"))
    with pytest.raises(EngineError, match="unknown model preset 'no-such-model'"):
        Engine(EngineArgs("no-such-model", load_format="dummy"))
    with pytest.raises(EngineError, match="not found"):
        Engine(EngineArgs(str(tmp_path / "nowhere")))
    with pytest.raises(EngineError, match="no config.json"):
        Engine(EngineArgs(str(tmp_path)))
    with pytest.raises(EngineError, match="unknown dtype"):
        Engine(EngineArgs("tiny-llama", load_format="dummy", dtype="int8"))
    with pytest.raises(EngineError, match="triton attention backend needs a CUDA device"):
        Engine(EngineArgs("tiny-llama", load_format="dummy", attention_backend="triton", device="cpu"))


def test_dummy_weights_are_deterministic():
    cfg = ModelConfig.from_preset("tiny-qwen3")
    a, b = CausalLM(cfg, torch.float32, "cpu"), CausalLM(cfg, torch.float32, "cpu")
    init_dummy(a, seed=5)
    init_dummy(b, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_engine_sizes_its_kv_cache_as_the_simulator(monkeypatch):
    """On a GPU the engine counts its blocks with ``specs.kv_cache_blocks`` and the simulator's
    activation reserve: a device with an H100 preset's memory, holding just the weights,
    gets the simulator's block count. (The CUDA calls are stubbed: this runs on the CPU.)"""
    from dataclasses import replace

    from fairbatch.specs import get_gpu, kv_cache_blocks

    engine = Engine(EngineArgs("tiny-llama", load_format="dummy", device="cpu", num_kv_blocks=8))
    spec = replace(get_model("tiny-llama"), dtype_bytes=engine.model.lm_head_weight.element_size())
    h100 = get_gpu("h100")
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (h100.memory_bytes, h100.memory_bytes))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: spec.weight_bytes)
    assert engine._auto_kv_blocks() == kv_cache_blocks(spec, h100) > 0
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(0.9 * h100.memory_bytes))
    with pytest.raises(EngineError, match="no memory left for the KV cache"):
        engine._auto_kv_blocks()
