"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) on flattened tokens.

A step is one forward over ``T`` tokens drawn from any mix of prefill chunks and
decodes: there is no batch dimension and no padding. Each token carries its absolute
position; attention reads every sequence's context from the paged KV cache through the
step's ``AttentionMetadata``. q/k/v and gate/up are fused into single matmuls (fewer,
larger GEMMs); ``weights.py`` maps Hugging Face tensor names onto the fused slices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fairbatch.engine.config import ModelConfig
from fairbatch.engine.ops import TorchOps
from fairbatch.engine.rope import cos_sin_table

if TYPE_CHECKING:
    from fairbatch.engine.attention import AttentionBackend, AttentionMetadata
    from fairbatch.engine.kv_cache import KVCache

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: the loader or the dummy initialiser fills every parameter.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _param(n_out, n_in, dtype=dtype, device=device)
        self.bias = _param(n_out, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Weight(nn.Module):
    """A module holding one ``weight`` (norms, embeddings), so names match HF's."""

    def __init__(self, *shape: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _param(*shape, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias, dtype, device)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype, device)
        self.q_norm = Weight(cfg.head_dim, dtype=dtype, device=device) if cfg.qk_norm else None
        self.k_norm = Weight(cfg.head_dim, dtype=dtype, device=device) if cfg.qk_norm else None
        self.eps = cfg.rms_norm_eps


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype, device)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = Weight(cfg.hidden_size, dtype=dtype, device=device)
        self.self_attn = Attention(cfg, dtype, device)
        self.post_attention_layernorm = Weight(cfg.hidden_size, dtype=dtype, device=device)
        self.mlp = MLP(cfg, dtype, device)


class CausalLM(nn.Module):
    """Parameter names mirror HF's (``model.layers.N.self_attn...``) except the fused
    ``qkv_proj`` and ``gate_up_proj``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int | None = None) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = cfg
        self.dtype = dtype
        self.device = device
        self.model = nn.Module()
        self.model.embed_tokens = Weight(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.model.norm = Weight(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        n_pos = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin", cos_sin_table(cfg, n_pos, device), persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # --- the forward pass, as pieces ---------------------------------------------------------
    # A layer is pre_attention -> attention -> post_attention. The eager forward below and the
    # piecewise CUDA graphs (piecewise_graph.py, which capture everything but attention) call
    # these same functions, so the two paths cannot drift apart.

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.model.embed_tokens.weight)

    def pre_attention(self, i: int, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                      slot_mapping: torch.Tensor, kv: KVCache, ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` up to attention: (add +) input norm, fused q/k/v, q/k norm and RoPE,
        and the new tokens' K/V written to their cache slots. -> (q ``[T, H, D]``, residual).
        ``residual`` is None for layer 0 (the embeddings become the residual stream)."""
        layer = self.model.layers[i]
        eps = self.config.rms_norm_eps
        if residual is None:
            residual = h
            x = ops.rms_norm(h, layer.input_layernorm.weight, eps)
        else:
            x, residual = ops.add_rms_norm(h, residual, layer.input_layernorm.weight, eps)
        a = layer.self_attn
        q = ops.qk_rope_cache(
            a.qkv_proj(x), a.num_heads, a.num_kv_heads, a.head_dim, positions, self.cos_sin,
            a.q_norm.weight if a.q_norm is not None else None,
            a.k_norm.weight if a.k_norm is not None else None, eps,
            kv.k[i], kv.v[i], slot_mapping)
        return q, residual

    def post_attention(self, i: int, o: torch.Tensor, residual: torch.Tensor,
                       ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` after attention (``o``: ``[T, H * D]``): output projection, add +
        norm, MLP. -> (the MLP's output, residual), the next piece's ``h`` and residual."""
        layer = self.model.layers[i]
        x, residual = ops.add_rms_norm(layer.self_attn.o_proj(o), residual,
                                       layer.post_attention_layernorm.weight, self.config.rms_norm_eps)
        m = layer.mlp
        return m.down_proj(ops.silu_mul(m.gate_up_proj(x))), residual

    def final_norm(self, h: torch.Tensor, residual: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        out, _ = ops.add_rms_norm(h, residual, self.model.norm.weight, self.config.rms_norm_eps)
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, attn: AttentionBackend, ops: TorchOps) -> torch.Tensor:
        """Hidden states after the final norm for every token, ``[T, hidden]``."""
        h = self.embed(input_ids)
        residual: torch.Tensor | None = None
        for i in range(self.config.num_layers):
            q, residual = self.pre_attention(i, h, residual, positions, meta.slot_mapping, kv, ops)
            o = attn.forward(q, kv.k[i], kv.v[i], meta)
            h, residual = self.post_attention(i, o.reshape(o.shape[0], -1), residual, ops)
        return self.final_norm(h, residual, ops)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight).float()
