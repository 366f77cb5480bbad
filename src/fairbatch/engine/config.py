"""Hugging Face ``config.json`` -> the architecture the engine builds (``ModelConfig``).

One decoder-only family covers Llama 2/3, Mistral, Qwen2/2.5 and Qwen3; their
differences are flags: q/k/v(/o) biases, per-head q/k RMSNorm, tied embeddings, RoPE
scaling. Anything else is rejected here with one message naming what is unsupported,
before a single weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF architecture class -> family. The family decides which flags a config may set.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_FAMILY_BY_MODEL_TYPE = {v: v for v in SUPPORTED_ARCHITECTURES.values()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("bfloat16", "float16", "float32")


class ModelConfigError(ValueError):
    """The model's config cannot be served by this engine (user-facing message)."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False         # Qwen2 (always), Llama/Qwen3 with attention_bias
    o_bias: bool = False           # Llama/Qwen3 attention_bias also biases o_proj
    mlp_bias: bool = False         # Llama's mlp_bias
    qk_norm: bool = False          # Qwen3
    dtype: str = "bfloat16"        # the checkpoint's dtype (what "auto" resolves to)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hf_config: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    # --- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], *, generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        family = None
        for a in archs:
            family = SUPPORTED_ARCHITECTURES.get(a)
            if family:
                break
        if family is None and not archs:
            family = _FAMILY_BY_MODEL_TYPE.get(str(cfg.get("model_type")))
        if family is None:
            name = ", ".join(archs) if archs else repr(cfg.get("model_type"))
            raise ModelConfigError(
                f"unsupported architecture {name}; the engine serves "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")

        def req(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ModelConfigError(f"config.json lacks {key!r} (needed for {family})")
            return cfg[key]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"unsupported hidden_act {act!r}; only 'silu' (gated MLP) is implemented")
        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelConfigError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        context = int(cfg.get("max_position_embeddings") or 2048)
        # A sliding window shorter than the context changes attention beyond it; within the
        # window full attention is exact, so serve at most the window instead.
        window = cfg.get("sliding_window")
        uses_window = family == "mistral" or bool(cfg.get("use_sliding_window"))
        if window and uses_window:
            context = min(context, int(window))

        # transformers v5 nests RoPE under rope_parameters; v4 files have rope_theta + rope_scaling.
        rope_params = cfg.get("rope_parameters") or {}
        theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = cfg.get("rope_scaling")
        if not scaling and rope_params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling:
            scaling = dict(scaling)
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ModelConfigError(f"unsupported rope_scaling type {rtype!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
            if rtype == "default":
                scaling = None
            elif rtype == "llama3":
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in scaling:
                        raise ModelConfigError(f"llama3 rope_scaling lacks {k!r}")
            elif "factor" not in scaling:
                raise ModelConfigError(f"{rtype} rope_scaling lacks 'factor'")
        if float(rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise ModelConfigError("partial_rotary_factor != 1 is not supported")

        attn_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = True if family == "qwen2" else attn_bias if family in ("llama", "qwen3") else False
        o_bias = attn_bias if family in ("llama", "qwen3") else False
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        if dtype not in DTYPES:
            dtype = "bfloat16"
        gen = generation_config or {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        return cls(
            family=family, vocab_size=int(req("vocab_size")), hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")), num_layers=int(req("num_hidden_layers")),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6), rope_theta=theta,
            max_position_embeddings=context, rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(cfg.get("mlp_bias", False)) and family == "llama",
            qk_norm=family == "qwen3", dtype=dtype, eos_token_ids=eos_ids,
            bos_token_id=None if bos is None else int(bos), hf_config=dict(cfg))

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise ModelConfigError(f"{p} has no config.json (expected a Hugging Face model directory)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_path} is not valid JSON: {e}") from None
        gen = None
        gen_path = p / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except json.JSONDecodeError:
                gen = None   # optional file: a broken one only loses its EOS hints
        return cls.from_hf(cfg, generation_config=gen)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        from fairbatch.specs import get_model

        try:
            spec = get_model(name)
        except ValueError as e:
            raise ModelConfigError(str(e)) from None
        return cls.from_hf(spec.to_hf_config())
