"""Hugging Face ``config.json`` -> the architecture the engine builds (``ModelConfig``).

The architecture is ``fairbatch.specs.ModelSpec``, the same object the simulator and the
latency models read; ``ModelConfig`` extends it with engine-only fields. One decoder-only
family covers Llama 2/3, Mistral, Qwen2/2.5 and Qwen3; their differences are flags:
q/k/v(/o) biases, per-head q/k RMSNorm, tied embeddings, RoPE scaling. Anything else is
rejected here with one message naming what is unsupported, before a single weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairbatch.specs import DTYPE_BYTES, ModelSpec, get_model

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("bfloat16", "float16", "float32")


class ModelConfigError(ValueError):
    """The model's config cannot be served by this engine (user-facing message)."""


@dataclass(frozen=True)
class ModelConfig(ModelSpec):
    """The architecture (``ModelSpec``, parsed by ``ModelSpec.from_hf_config``) plus what
    only the engine needs: the checkpoint's dtype name, EOS/BOS ids and the raw config."""

    dtype: str = "bfloat16"        # the checkpoint's dtype (what "auto" resolves to)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hf_config: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if DTYPE_BYTES.get(self.dtype) != self.dtype_bytes:
            raise ValueError(f"dtype {self.dtype!r} does not have {self.dtype_bytes} bytes")

    @property
    def spec(self) -> ModelSpec:
        """The architecture alone (what latency models and KV sizing take)."""
        return ModelSpec(**self.to_dict())

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    # --- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], *, generation_config: Mapping[str, Any] | None = None,
                name: str = "model") -> ModelConfig:
        """Parse with ``ModelSpec.from_hf_config`` after rejecting what the engine cannot run
        (another activation, RoPE scaling it does not implement, partial rotary)."""
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"unsupported hidden_act {act!r}; only 'silu' (gated MLP) is implemented")
        rope_params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default"
                                             else None)
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ModelConfigError(f"unsupported rope_scaling type {rtype!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
            needed = (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                      if rtype == "llama3" else ("factor",) if rtype != "default" else ())
            missing = next((k for k in needed if k not in scaling), None)
            if missing:
                raise ModelConfigError(f"{rtype} rope_scaling lacks {missing!r}")
        if float(rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise ModelConfigError("partial_rotary_factor != 1 is not supported")

        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        gen = generation_config or {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        try:
            return cls.from_hf_config(
                cfg, name, dtype=dtype if dtype in DTYPES else "bfloat16", eos_token_ids=eos_ids,
                bos_token_id=None if bos is None else int(bos), hf_config=dict(cfg))
        except ValueError as e:
            raise ModelConfigError(str(e)) from None

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
        return cls.from_hf(cfg, generation_config=gen, name=p.name)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """A preset's spec as it is, with its HF config for ``save_hf`` (dummy weights)."""
        try:
            spec = get_model(name)
        except ValueError as e:
            raise ModelConfigError(str(e)) from None
        dtype = {2: "bfloat16", 4: "float32"}[spec.dtype_bytes]
        return cls(**spec.to_dict(), dtype=dtype, hf_config=spec.to_hf_config())
