"""Shared helpers of the engine tests (no tests here): tiny random checkpoints written as HF directories
(so every test also exercises our safetensors loader) and transformers references."""

from __future__ import annotations

from pathlib import Path

import torch

from fairbatch.engine.config import ModelConfig
from fairbatch.engine.model import CausalLM
from fairbatch.engine.weights import init_dummy, save_hf
from fairbatch.specs import get_model


def variant_config(name: str) -> dict:
    """HF config.json dicts of the architectures the engine claims to serve."""
    if name in ("tiny-llama", "tiny-qwen3"):
        return get_model(name).to_hf_config()
    if name == "tiny-llama31":        # Llama 3.1 RoPE scaling, attention biases, untied head
        cfg = get_model("tiny-llama").to_hf_config()
        cfg.update(attention_bias=True, rope_theta=500000.0, max_position_embeddings=4096,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return cfg
    if name == "tiny-qwen2":          # q/k/v biases, MHA (no GQA)
        cfg = get_model("tiny-llama").to_hf_config()
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=4,
                   use_sliding_window=False, sliding_window=None, rms_norm_eps=1e-6)
        cfg.pop("attention_bias", None)
        cfg.pop("mlp_bias", None)
        return cfg
    if name == "tiny-mistral":
        cfg = get_model("tiny-llama").to_hf_config()
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
        cfg.pop("attention_bias", None)
        cfg.pop("mlp_bias", None)
        return cfg
    raise KeyError(name)


def write_checkpoint(name: str, path: Path, *, seed: int = 0, max_shard_bytes: int | None = None,
                     std: float = 0.05) -> Path:
    cfg = ModelConfig.from_hf(variant_config(name))
    model = CausalLM(cfg, torch.float32, "cpu")
    init_dummy(model, seed=seed, std=std)
    return save_hf(model, path, max_shard_bytes=max_shard_bytes, dtype=torch.float32)


def hf_model(path: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                          attn_implementation="eager")
    return m.eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(ids):].tolist()
