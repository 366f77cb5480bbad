"""Serving without a model: ``--load-format simulated``.

``SimulatedExecutor`` runs no forward pass. Each step takes what the scheduler's own
step-time model (``latency/``: a shipped GPU profile, or ``--profile``) predicts for it,
waited out with a sleep (the engine loop never spins a core), and then "samples" a
synthetic token for every request whose chunk reached the end of its known tokens. So a
``fairbatch serve`` on a small CPU machine shows HTTP clients a GPU server's step rates,
with the real scheduler, KV accounting, front end and metrics; only the token ids (and
the logprobs of requests that ask) are made up. It exists to measure and cut what the
served stack adds on top of the engine (``benchmarks/micro/served_delay.py``).

``SimulatedEngine`` is ``Engine`` without weights or KV tensors: the same config,
tokenizer, block allocator and latency-model choice, with the KV cache sized as the
simulator sizes it for the model on the simulated GPU (``specs.kv_cache_blocks``). The
simulated GPU is the one the profile names (``--profile .../llama-3-8b_h200.json``: an
H200's step times and memory), else an H100 (the shipped profile of ``--model`` there).
"""

from __future__ import annotations

import time
from pathlib import Path

from fairbatch.engine.config import ModelConfig, ModelConfigError
from fairbatch.engine.sampler import params_of
from fairbatch.engine.tokenizer import ByteTokenizer, load_tokenizer
from fairbatch.kv import BlockAllocator
from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request
from fairbatch.specs import default_activation_reserve, get_gpu, gpu_names, kv_cache_blocks

SIMULATED = "simulated"
SIMULATED_DEVICE_PREFIX = "simulated-"     # the device clients see (/v1/models): simulated-h100
# Synthetic output cycles through the ids of these characters: ids below 256 are single
# characters in the byte tokenizer (this text, verbatim) and in byte-level BPE
# vocabularies (Llama 3, Qwen 2.5: other characters), so clients read plain text.
SYNTHETIC_TEXT = "simulated output "
DEFAULT_GPU = "h100"                # with no profile: the shipped profiles of every preset are H100s
SYNTHETIC_LOGPROB = -20.0           # the made-up alternatives' logprob (the chosen token: 0.0)


def profile_gpu(model: LatencyModel | None) -> str | None:
    """The GPU preset a measured profile was taken on, if it says and the preset exists."""
    gpu = (getattr(model, "meta", None) or {}).get("gpu")
    return gpu if gpu in gpu_names() else None


def synthetic_token(position: int) -> int:
    """The output token at ``position`` (0 = first) of any request."""
    return ord(SYNTHETIC_TEXT[position % len(SYNTHETIC_TEXT)])


def synthetic_logprobs(token: int, k: int) -> list[tuple[int, float, int]]:
    """``token`` first (certain, rank 1), then a top ``k`` led by it."""
    others = [ord(c) for c in dict.fromkeys(SYNTHETIC_TEXT) if ord(c) != token]
    top = [(token, 0.0, 1)] + [(t, SYNTHETIC_LOGPROB, r + 2) for r, t in enumerate(others[:max(0, k - 1)])]
    return [(token, 0.0, 1)] + top[:k]


class SimulatedExecutor:
    """An ``Executor`` whose steps last what ``model`` predicts and whose tokens are
    synthetic. It never emits EOS (outputs run to ``max_tokens``, as with ``ignore_eos``);
    a request's own ``stop_token_ids`` still stop it if a synthetic token is one of them."""

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.steps = 0
        self.graphs = None              # what the engine's executor has for CUDA graphs

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(self.prepare(plan)))

    # --- OverlappingExecutor: the step's "device" time is a deadline to sleep until -----
    def prepare(self, plan: StepPlan) -> tuple[StepPlan, StepResult]:
        """The step's tokens, from the requests' state at planning time."""
        tokens: dict[str, int] = {}
        stopped: set[str] = set()
        logprobs: dict[str, list] = {}
        prompt_logprobs: dict[str, tuple[int, list]] = {}
        for req, k in plan.chunks:
            p = params_of(req)
            c = req.num_computed
            if p.prompt_logprobs is not None and c + 1 < req.prompt_len:
                lo, hi = c + 1, min(c + k, req.prompt_len - 1) + 1
                entries = [synthetic_logprobs(t, p.prompt_logprobs) for t in req.prompt_token_ids[lo:hi]]
                prompt_logprobs[req.request_id] = (lo, entries)
            if c + k != req.prompt_len + req.generated:
                continue                # a prefill chunk short of the prompt's end samples nothing
            tok = synthetic_token(req.generated)
            tokens[req.request_id] = tok
            if tok in p.stop_token_ids and req.generated >= p.min_tokens:
                stopped.add(req.request_id)
            if p.logprobs is not None:
                logprobs[req.request_id] = synthetic_logprobs(tok, p.logprobs)
        return plan, StepResult(0.0, tokens, stopped, logprobs or None, prompt_logprobs or None)

    def launch(self, prepared: tuple[StepPlan, StepResult]) -> tuple[float, float, StepResult]:
        plan, result = prepared
        t0 = time.perf_counter()
        return t0, t0 + self.model.predict(plan.features), result

    def collect(self, launched: tuple[float, float, StepResult]) -> StepResult:
        t0, wake, result = launched
        # the predicted step time, slept rather than spun: the front end shares these cores
        pause = wake - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        self.steps += 1
        result.duration = time.perf_counter() - t0
        return result

    def release(self, request: Request) -> None:
        pass


class SimulatedEngine:
    """What ``LLM`` reads of an ``Engine`` (args, config, name, device, limits, tokenizer,
    EOS ids, allocator, executor, default latency model), built without a model."""

    def __init__(self, args, latency_model: LatencyModel | None = None) -> None:   # noqa: ANN001 - EngineArgs
        from fairbatch.engine.llm import EngineError

        self.args = args
        self.gpu_name = profile_gpu(latency_model) or DEFAULT_GPU
        p = Path(args.model).expanduser()
        try:
            cfg = ModelConfig.from_dir(p) if p.is_dir() else ModelConfig.from_preset(args.model)
        except ModelConfigError as e:
            raise EngineError(str(e)) from None
        self.config = cfg
        self.name = p.name if p.is_dir() else args.model
        # what /v1/models and the serve banner show; no torch device is ever used
        self.device = SIMULATED_DEVICE_PREFIX + self.gpu_name
        limit = cfg.max_position_embeddings
        if args.max_model_len and args.max_model_len > limit:
            raise EngineError(f"max_model_len {args.max_model_len} exceeds the model's context of {limit} tokens")
        self.max_model_len = min(args.max_model_len or limit, limit)
        tok_dir = args.tokenizer or (str(p) if p.is_dir() else None)
        self.tokenizer = load_tokenizer(tok_dir, cfg.vocab_size, cfg.eos_token_ids)
        self.eos_token_ids = (self.tokenizer.eos_token_ids if isinstance(self.tokenizer, ByteTokenizer)
                              else tuple(sorted(set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids))))
        num_blocks = args.num_kv_blocks or self._gpu_kv_blocks()
        self.allocator = BlockAllocator(num_blocks, args.block_size, prefix_caching=args.enable_prefix_caching)
        self.executor = SimulatedExecutor(latency_model or self.default_latency_model())

    def _gpu_kv_blocks(self) -> int:
        """The KV cache the engine would have on the simulated GPU (the simulator's count)."""
        from fairbatch.engine.llm import EngineError

        args = self.args
        reserve = default_activation_reserve(self.config.spec, args.max_num_batched_tokens, args.max_num_seqs)
        try:
            return kv_cache_blocks(self.config.spec, get_gpu(self.gpu_name), block_size=args.block_size,
                                   gpu_memory_utilization=args.gpu_memory_utilization,
                                   activation_reserve_bytes=reserve)
        except ValueError as e:
            raise EngineError(f"no memory left for the KV cache: {e}") from None

    def default_latency_model(self) -> LatencyModel:
        executor = getattr(self, "executor", None)
        if executor is not None:
            return executor.model
        from fairbatch.engine.llm import Engine

        return Engine.default_latency_model(self)     # type: ignore[arg-type]  # reads name, config, gpu_name


__all__ = ["SIMULATED", "SIMULATED_DEVICE_PREFIX", "SimulatedEngine", "SimulatedExecutor", "synthetic_token"]
