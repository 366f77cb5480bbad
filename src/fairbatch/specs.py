"""Model and GPU presets: the architecture numbers the roofline latency model, the KV
budget and the engine's model builder all derive from (no dependencies).

Model presets copy the published Hugging Face ``config.json`` values. GPU presets hold
datasheet peaks plus the fraction of them that is actually achievable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Self

GB = 10**9
GiB = 2**30

# family -> (HF architecture class, model_type)
_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_FAMILY = {arch: family for family, arch in _ARCH.items()}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only Llama-family transformer (Llama, Mistral, Qwen2, Qwen3): the one
    description of a model's architecture that the latency models, the KV sizing, the
    simulator and the engine all read (the engine's ``ModelConfig`` extends it with what
    only the engine needs: dtype name, EOS/BOS ids, the raw ``config.json``).

    ``family`` picks the HF architecture and its quirks: Qwen2 has q/k/v biases
    (``attention_bias``), Llama and Qwen3 with ``attention_bias`` also bias ``o_proj``,
    Llama may bias its MLP (``mlp_bias``), Qwen3 RMS-normalises q and k per head
    (``qk_norm``). ``max_position_embeddings`` is the default serving context.
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    dtype_bytes: int = 2
    family: str = "llama"
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    # e.g. Llama-3.1's {"rope_type": "llama3", ...}; kept verbatim for the engine to apply.
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False)
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.family not in _ARCH:
            raise ValueError(f"unknown model family {self.family!r}; choose from {', '.join(_ARCH)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.mlp_bias and self.family != "llama":
            raise ValueError(f"{self.family} has no MLP bias (mlp_bias is Llama's)")

    @property
    def o_bias(self) -> bool:
        """Llama's and Qwen3's ``attention_bias`` biases o_proj too; Qwen2's q/k/v only."""
        return self.attention_bias and self.family in ("llama", "qwen3")

    # --- sizes ---------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's linears: q, k, v, o and the gated MLP (gate, up, down)."""
        h = self.hidden_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size

    @property
    def layer_params(self) -> int:
        bias = self.q_size + 2 * self.kv_size if self.attention_bias else 0
        bias += self.hidden_size if self.o_bias else 0
        bias += 2 * self.intermediate_size + self.hidden_size if self.mlp_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        return self.layer_matmul_params + bias + 2 * self.hidden_size + qk_norm   # + 2 RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Exact parameter count from the shapes (matches HF ``model.num_parameters()``)."""
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + lm_head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def streamed_weight_bytes(self) -> int:
        """Weight bytes one forward pass reads: everything but an untied embedding table,
        of which only the looked-up rows are touched."""
        untied_embedding = 0 if self.tie_word_embeddings else self.embedding_params
        return (self.num_params - untied_embedding) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_size * self.dtype_bytes

    # --- FLOPs ---------------------------------------------------------------------------
    @property
    def layer_flops_per_token(self) -> int:
        """Matmul FLOPs of all transformer layers for one token (2 per weight)."""
        return 2 * self.num_layers * self.layer_matmul_params

    @property
    def lm_head_flops_per_token(self) -> int:
        return 2 * self.vocab_size * self.hidden_size

    @property
    def flops_per_token(self) -> int:
        """Linear-layer FLOPs of a token whose logits are computed (the usual ~2N)."""
        return self.layer_flops_per_token + self.lm_head_flops_per_token

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs per query-key pair: QK^T and PV, each a head_dim dot product per head."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    # --- Hugging Face config -------------------------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        dtype = {2: "bfloat16", 4: "float32"}.get(self.dtype_bytes)
        if dtype is None:
            raise ValueError(f"no HF dtype for dtype_bytes={self.dtype_bytes}")
        d: dict[str, Any] = {
            "architectures": [_ARCH[self.family]],
            "model_type": self.family,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": dtype,
        }
        if self.family == "qwen2":
            if not self.attention_bias:
                raise ValueError("Qwen2 always has q/k/v biases (attention_bias=True)")
            d.update(use_sliding_window=False, sliding_window=None)
        elif self.family == "qwen3":
            if not self.qk_norm:
                raise ValueError("Qwen3 always has qk_norm=True")
            d.update(attention_bias=self.attention_bias, use_sliding_window=False, sliding_window=None)
        elif self.family == "mistral":
            if self.attention_bias or self.qk_norm:
                raise ValueError("Mistral has no attention bias or qk_norm")
            d["sliding_window"] = None   # HF's default is 4096; v0.2+ use full attention
        else:
            if self.qk_norm:
                raise ValueError("Llama has no qk_norm; use family='qwen3'")
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        return d

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str = "model", **extra: Any) -> Self:
        """Build a spec from a HF ``config.json`` dict of a supported architecture (the family
        comes from ``architectures``, else ``model_type``). ``extra`` goes to the constructor:
        a subclass (the engine's ``ModelConfig``) passes its own fields through it. Raises
        ``ValueError`` naming what is missing or unsupported."""
        archs = config.get("architectures") or []
        family = next((_FAMILY[a] for a in archs if a in _FAMILY), None)
        if family is None and not archs and config.get("model_type") in _ARCH:
            family = str(config["model_type"])
        if family is None:
            what = ", ".join(archs) if archs else repr(config.get("model_type"))
            raise ValueError(f"unsupported architecture {what}; supported: {', '.join(_FAMILY)}")

        def req(key: str) -> int:
            if config.get(key) is None:
                raise ValueError(f"HF config of {name!r} lacks {key!r} (needed for {family})")
            return int(config[key])

        hidden, heads = req("hidden_size"), req("num_attention_heads")
        context = int(config.get("max_position_embeddings") or 2048)
        # A sliding window shorter than the context changes attention past it: serve at
        # most the window, where full attention is exact.
        window = config.get("sliding_window")
        if window and (family == "mistral" or config.get("use_sliding_window")):
            context = min(context, int(window))
        rope = config.get("rope_parameters") or {}   # transformers v5 nests RoPE here
        theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = config.get("rope_scaling")
        if not scaling and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            name=name,
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_layers=req("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=req("vocab_size"),
            max_position_embeddings=context,
            rope_theta=float(theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            dtype_bytes=DTYPE_BYTES.get(str(dtype), 2),
            family=family,
            attention_bias={"qwen2": True, "mistral": False}.get(family, attention_bias),
            rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
            rope_scaling=dict(scaling) if scaling else None,
            mlp_bias=family == "llama" and bool(config.get("mlp_bias", False)),
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec's own fields (a subclass's extra fields are left out)."""
        d = {f.name: getattr(self, f.name) for f in fields(ModelSpec)}
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: datasheet peaks and the fractions of them kernels really reach.

    The roofline uses ``bandwidth = hbm_bandwidth * mem_eff`` and
    ``flops = bf16_flops * flops_eff`` (dense bf16, no sparsity).
    """

    name: str
    memory_bytes: int
    hbm_bandwidth: float     # bytes/s, datasheet
    bf16_flops: float        # FLOP/s, dense, datasheet
    mem_eff: float = 0.9     # typical streaming-kernel fraction of peak HBM bandwidth
    flops_eff: float = 0.79  # typical large-GEMM fraction of peak bf16

    @property
    def bandwidth(self) -> float:
        return self.hbm_bandwidth * self.mem_eff

    @property
    def flops(self) -> float:
        return self.bf16_flops * self.flops_eff

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _llama(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int,
           context: int, theta: float, **kw: Any) -> ModelSpec:
    return ModelSpec(name, hidden, inter, layers, heads, kv, hidden // heads, vocab, context, theta, **kw)


_MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    # meta-llama/Meta-Llama-3-8B
    _llama("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0),
    # meta-llama/Meta-Llama-3-70B
    _llama("llama-3-70b", 8192, 28672, 80, 64, 8, 128256, 8192, 500000.0),
    # meta-llama/Llama-2-7b-hf
    _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, 4096, 10000.0),
    # Qwen/Qwen2.5-7B-Instruct (the base config says 131072, served with YaRN only)
    _llama("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, 32768, 1000000.0,
           family="qwen2", attention_bias=True, rms_norm_eps=1e-6),
    # mistralai/Mistral-7B-Instruct-v0.3 (v0.1's shape, 32768 vocab, no sliding window)
    _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32768, 32768, 1000000.0, family="mistral"),
    # Qwen/Qwen3-8B
    _llama("qwen3-8b", 4096, 12288, 36, 32, 8, 151936, 40960, 1000000.0,
           family="qwen3", qk_norm=True, rms_norm_eps=1e-6),
    # test models an engine instantiates on CPU in milliseconds
    _llama("tiny-llama", 64, 128, 2, 4, 2, 512, 2048, 10000.0),
    _llama("tiny-qwen3", 64, 128, 2, 4, 2, 512, 2048, 1000000.0,
           family="qwen3", qk_norm=True, tie_word_embeddings=True, rms_norm_eps=1e-6),
)}

_GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    # H100 SXM 80GB: 3.35 TB/s, 989 TFLOP/s datasheet. The efficiencies make the achievable
    # numbers the ceilings measured on the lent H100 (2026-11-22, docs/PERFORMANCE.md): 3.0 TB/s
    # device copy (read + write) and 780 TFLOP/s bf16 GEMM at 8192^3.
    GPUSpec("h100", 80 * GiB, 3.35e12, 989.4e12, mem_eff=3.0e12 / 3.35e12, flops_eff=780e12 / 989.4e12),
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s, H100 compute; efficiencies assumed like H100's.
    GPUSpec("h200", 141 * GiB, 4.8e12, 989.4e12),
    # A100 SXM 80GB: 2.0 TB/s, 312 TFLOP/s; efficiencies assumed.
    GPUSpec("a100", 80 * GiB, 2.0e12, 312e12),
)}


def model_names() -> list[str]:
    return list(_MODELS)


def gpu_names() -> list[str]:
    return list(_GPUS)


def get_model(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(_MODELS)}") from None


def get_gpu(name: str) -> GPUSpec:
    try:
        return _GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU preset {name!r}; choose from {', '.join(_GPUS)}") from None


def gpu_preset_for(device_name: str) -> str | None:
    """The GPU preset of a device name as CUDA reports it ("NVIDIA H100 80GB HBM3" -> "h100"),
    or ``None`` for a GPU without a preset."""
    name = device_name.lower()
    return next((g for g in ("h200", "h100", "a100") if g in name), None)


def default_activation_reserve(model: ModelSpec, max_num_batched_tokens: int = 8192,
                               max_num_seqs: int = 256) -> int:
    """Memory vLLM's profiling run would find beyond weights and KV: the peak activations
    of a ``max_num_batched_tokens`` forward (the MLP's gate+up output and a few hidden-size
    buffers), float32 logits of ``max_num_seqs`` sampled rows, and ~1 GiB of CUDA context,
    allocator slack and graphs. The simulator and the engine both reserve this."""
    per_token = (2 * model.intermediate_size + 4 * model.hidden_size + model.q_size + 2 * model.kv_size)
    activations = max_num_batched_tokens * per_token * model.dtype_bytes
    logits = max_num_seqs * model.vocab_size * 4
    return activations + logits + GiB


def kv_cache_blocks(model: ModelSpec, gpu: GPUSpec | int, *, gpu_memory_utilization: float = 0.9,
                    block_size: int = 16, activation_reserve_bytes: int | None = None,
                    resident_bytes: int | None = None, free_bytes: int | None = None) -> int:
    """KV blocks of ``block_size`` tokens that fit in ``gpu_memory_utilization`` of the
    GPU's memory after the weights and an activation reserve (as vLLM sizes its cache).

    The one sizing of the KV cache: the simulator calls it with a GPU preset, the engine
    with the device's measured memory (``gpu`` as bytes), what is already allocated
    (``resident_bytes``: weights and tables; default ``model.weight_bytes``) and what the
    device has free (``free_bytes``: other processes' memory is not ours). The reserve
    defaults to ``default_activation_reserve(model)`` (8192 batched tokens, 256 sequences);
    a host with other limits passes its own from that function. So for one model, GPU and
    utilisation the simulator's count is the engine's, up to the preset's memory size
    versus what the device reports."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    memory, gpu_name = (gpu, "the GPU") if isinstance(gpu, int) else (gpu.memory_bytes, gpu.name)
    reserve = default_activation_reserve(model) if activation_reserve_bytes is None else activation_reserve_bytes
    resident = model.weight_bytes if resident_bytes is None else resident_bytes
    budget = memory * gpu_memory_utilization - resident
    if free_bytes is not None:
        budget = min(budget, free_bytes)
    free = budget - reserve
    if free < block_size * model.kv_bytes_per_token:
        raise ValueError(
            f"{model.name} weights ({resident / GB:.2f} GB) plus an activation reserve "
            f"({reserve / GB:.2f} GB) do not fit in {gpu_memory_utilization:.0%} of {gpu_name}'s "
            f"{memory / GB:.1f} GB; use a larger GPU, a smaller model or more GPUs")
    return int(free // (block_size * model.kv_bytes_per_token))
