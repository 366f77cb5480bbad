"""Weights: Hugging Face safetensors (single file or sharded with an index), random
("dummy") initialisation, and export back to a HF directory.

Every HF tensor name maps to one slice of one of our parameters (q/k/v land in rows of
the fused ``qkv_proj``, gate/up in ``gate_up_proj``). Loading checks that each slice is
written exactly once with the right shape; anything missing, unexpected or misshapen is
reported by its HF name in a single ``WeightsError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fairbatch.engine.model import CausalLM

INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the engine recomputes or never needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """The checkpoint does not fit the model (user-facing message)."""


@dataclass(frozen=True)
class _Slot:
    param: torch.Tensor
    start: int | None          # row range inside a fused parameter; None = whole tensor
    stop: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.start is None:
            return tuple(self.param.shape)
        return (self.stop - self.start, *self.param.shape[1:])

    def target(self) -> torch.Tensor:
        return self.param.data if self.start is None else self.param.data[self.start:self.stop]


def hf_slots(model: CausalLM) -> dict[str, _Slot]:
    """HF tensor name -> where it goes in ``model``."""
    cfg = model.config
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    slots: dict[str, _Slot] = {
        "model.embed_tokens.weight": _Slot(model.model.embed_tokens.weight, None, None),
        "model.norm.weight": _Slot(model.model.norm.weight, None, None),
    }
    if model.lm_head is not None:
        slots["lm_head.weight"] = _Slot(model.lm_head.weight, None, None)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        kinds = ["weight"] + (["bias"] if a.qkv_proj.bias is not None else [])
        for kind in kinds:
            fused = getattr(a.qkv_proj, kind)
            slots[p + f"self_attn.q_proj.{kind}"] = _Slot(fused, 0, q)
            slots[p + f"self_attn.k_proj.{kind}"] = _Slot(fused, q, q + kv)
            slots[p + f"self_attn.v_proj.{kind}"] = _Slot(fused, q + kv, q + 2 * kv)
        slots[p + "self_attn.o_proj.weight"] = _Slot(a.o_proj.weight, None, None)
        if a.o_proj.bias is not None:
            slots[p + "self_attn.o_proj.bias"] = _Slot(a.o_proj.bias, None, None)
        if a.q_norm is not None:
            slots[p + "self_attn.q_norm.weight"] = _Slot(a.q_norm.weight, None, None)
            slots[p + "self_attn.k_norm.weight"] = _Slot(a.k_norm.weight, None, None)
        for kind in ["weight"] + (["bias"] if m.gate_up_proj.bias is not None else []):
            gu = getattr(m.gate_up_proj, kind)
            slots[p + f"mlp.gate_proj.{kind}"] = _Slot(gu, 0, inter)
            slots[p + f"mlp.up_proj.{kind}"] = _Slot(gu, inter, 2 * inter)
            slots[p + f"mlp.down_proj.{kind}"] = _Slot(getattr(m.down_proj, kind), None, None)
        slots[p + "input_layernorm.weight"] = _Slot(layer.input_layernorm.weight, None, None)
        slots[p + "post_attention_layernorm.weight"] = _Slot(layer.post_attention_layernorm.weight, None, None)
    return slots


def safetensors_files(path: str | Path) -> dict[Path, list[str] | None]:
    """Files to read -> the tensor names the index promises in each (None: no index)."""
    d = Path(path)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index: {e}") from None
        files: dict[Path, list[str] | None] = {}
        for name, fname in weight_map.items():
            files.setdefault(d / fname, []).append(name)
        for f in files:
            if not f.is_file():
                raise WeightsError(f"shard {f.name} listed in {INDEX_FILE} is missing from {d}")
        return files
    found = sorted(d.glob("*.safetensors"))
    if not found:
        extra = " (found PyTorch .bin weights: convert them to safetensors)" if list(d.glob("*.bin")) else ""
        raise WeightsError(f"no *.safetensors weights in {d}{extra}")
    return {f: None for f in found}


@torch.inference_mode()
def load_safetensors(model: CausalLM, path: str | Path) -> None:
    from safetensors import safe_open

    slots = hf_slots(model)
    seen: set[str] = set()
    tied = model.lm_head is None
    for fpath, promised in safetensors_files(path).items():
        with safe_open(str(fpath), framework="pt", device="cpu") as f:
            names = set(f.keys())
            if promised is not None:
                lost = [n for n in promised if n not in names]
                if lost:
                    raise WeightsError(f"tensor {lost[0]!r} is listed in {INDEX_FILE} but missing from {fpath.name}")
            for name in sorted(names):
                slot = slots.get(name)
                if slot is None:
                    if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                        continue
                    raise WeightsError(
                        f"unexpected tensor {name!r} in {fpath.name}: not part of a "
                        f"{model.config.family} model with this config")
                t = f.get_tensor(name)
                if tuple(t.shape) != slot.shape:
                    raise WeightsError(f"tensor {name!r} in {fpath.name} has shape {tuple(t.shape)}, "
                                       f"the config implies {slot.shape}")
                slot.target().copy_(t.to(model.dtype))
                seen.add(name)
    missing = [n for n in slots if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"checkpoint {path} lacks tensor {missing[0]!r}{more}")


@torch.inference_mode()
def init_dummy(model: CausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights drawn on the model's device (a GPU fills 16 GB in well under a
    second). Norm weights near 1 and small biases, so activations stay O(1) and
    tests still exercise every parameter."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "layernorm.weight")):
            p.data.normal_(1.0, 0.1, generator=gen)
        elif name.endswith(".bias"):
            p.data.normal_(0.0, std, generator=gen)
        else:
            p.data.normal_(0.0, std, generator=gen)


@torch.inference_mode()
def save_hf(model: CausalLM, path: str | Path, *, max_shard_bytes: int | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a HF directory (config.json + safetensors, sharded with an index
    when ``max_shard_bytes`` is given): what transformers loads, and what we load back."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {name: s.target().to(dtype or model.dtype).cpu().contiguous() for name, s in hf_slots(model).items()}
    cfg = dict(model.config.hf_config)
    cfg["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                          torch.float32: "float32"}[dtype or model.dtype]
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if not max_shard_bytes:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update((n, fname) for n in shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return d
