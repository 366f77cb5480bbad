"""``LLM``: offline generation in the spirit of vLLM's ``LLM.generate``, on the same
``Instance`` + scheduler policy objects the simulator runs, driven by a real clock.

``Engine`` owns the pieces (model, tokenizer, paged KV cache, block allocator,
executor); ``LLM`` adds a scheduler policy and the step loop. KV capacity: on CUDA, the
blocks that fit in ``gpu_memory_utilization`` of the GPU after the weights and an
activation reserve, sized by ``specs.kv_cache_blocks`` as in the simulator; on the CPU a
configurable count. The cache has exactly as many
blocks as the scheduler's allocator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fairbatch.engine.attention import make_backend
from fairbatch.engine.config import ModelConfig, ModelConfigError
from fairbatch.engine.executor import EngineExecutor
from fairbatch.engine.kv_cache import KVCache
from fairbatch.engine.model import TORCH_DTYPES, CausalLM
from fairbatch.engine.ops import make_ops
from fairbatch.engine.outputs import CompletionOutput, logprob_dicts
from fairbatch.engine.params import RequestOutput, SamplingParams, prefix_cache_hashes
from fairbatch.engine.sampler import Sampler
from fairbatch.engine.stop_strings import StopStrings
from fairbatch.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from fairbatch.engine.weights import WeightsError, init_dummy, load_safetensors
from fairbatch.instance import Instance
from fairbatch.kv import BlockAllocator, check_fits
from fairbatch.latency.base import LatencyModel
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import SLO, Request, RequestState
from fairbatch.scheduler.base import SchedulerConfig, make_scheduler
from fairbatch.specs import default_activation_reserve, gpu_preset_for, kv_cache_blocks
from fairbatch.step_ahead import StepAhead

LOAD_FORMATS = ("auto", "safetensors", "dummy", "simulated")   # simulated: engine/simulated.py
CPU_DEFAULT_KV_BLOCKS = 1024


class EngineError(ValueError):
    """A user-facing configuration problem (bad model path, format, dtype, sizes)."""


@dataclass
class EngineArgs:
    model: str                                  # preset name (dummy weights) or HF directory
    load_format: str = "auto"                   # auto | safetensors | dummy
    dtype: str = "auto"                         # auto (the checkpoint's) | bfloat16 | float16 | float32
    device: str | None = None                   # default: cuda if available, else cpu
    attention_backend: str | None = None        # torch | triton; default by device
    num_kv_blocks: int | None = None            # default: from GPU memory; 1024 on CPU
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    block_size: int = 16
    seed: int = 0
    cuda_graphs: bool = True                    # decode-only steps replay captured graphs (triton)
    # larger mixed/prefill steps replay per-bucket graphs of everything but attention
    # (piecewise_graph.py); off until validated on a GPU (docs/PERFORMANCE.md)
    piecewise_cuda_graphs: bool = False
    # triton backend, eager steps: decode attention on a second stream beside the prefill
    # chunks' (attention_overlap), prefill chunks through torch's SDPA (prefill_attention
    # "sdpa"); both off until measured on a GPU (docs/PERFORMANCE.md)
    attention_overlap: bool = False
    prefill_attention: str = "triton"
    # plan each step while the last one runs (vLLM's async_scheduling; step_ahead.py): in
    # `fairbatch serve` and LLM.generate/run; off until measured on a GPU (docs/PERFORMANCE.md)
    async_scheduling: bool = False
    tokenizer: str | None = None                # directory with tokenizer.json; default: the model's
    max_num_batched_tokens: int = 8192
    # 256, not the simulator's 1024 (scheduler.config.DEFAULT_MAX_NUM_SEQS, vLLM's H100/H200
    # default): vLLM's default below 70 GB. The engine also runs on CPUs and small GPUs,
    # each running sequence reserves a float32 logits row out of the KV cache
    # (specs.default_activation_reserve) and CUDA graphs cover at most 256 decodes. The
    # `fairbatch serve` / `generate` flags default to the same 256.
    max_num_seqs: int = 256
    # automatic prefix caching (vLLM's enable_prefix_caching, on by default there too): full
    # prompt blocks are named by a hash of their whole prefix, and a request whose leading
    # blocks are cached reuses their KV instead of computing it (docs/PREFIX_CACHING.md)
    enable_prefix_caching: bool = True


def _resolve_model(args: EngineArgs) -> tuple[ModelConfig, Path | None, str]:
    """-> (config, weights directory or None for dummy, a name for profiles)."""
    p = Path(args.model).expanduser()
    if args.load_format not in LOAD_FORMATS:
        raise EngineError(f"unknown load format {args.load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
    if p.is_dir():
        cfg = ModelConfig.from_dir(p)
        return cfg, (None if args.load_format == "dummy" else p), p.name
    if args.load_format == "dummy":
        return ModelConfig.from_preset(args.model), None, args.model
    if "/" in args.model or p.exists():
        raise EngineError(f"model directory {args.model!r} not found")
    ModelConfig.from_preset(args.model)       # an unknown name fails here, listing the presets
    raise EngineError(f"{args.model!r} is a preset without weights: pass --load-format dummy for "
                      f"random weights, or a Hugging Face model directory")


class Engine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        try:
            cfg, weights_dir, name = _resolve_model(args)
        except ModelConfigError as e:
            raise EngineError(str(e)) from None
        self.config = cfg
        self.name = name
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda requested but torch.cuda is not available")
        dtype_name = cfg.dtype if args.dtype == "auto" else args.dtype
        if dtype_name not in TORCH_DTYPES:
            raise EngineError(f"unknown dtype {args.dtype!r}; choose auto, bfloat16, float16 or float32")
        self.dtype = TORCH_DTYPES[dtype_name]
        limit = cfg.max_position_embeddings
        self.max_model_len = min(args.max_model_len or limit, limit)
        if args.max_model_len and args.max_model_len > limit:
            raise EngineError(f"max_model_len {args.max_model_len} exceeds the model's context of {limit} tokens")

        self.model = CausalLM(cfg, self.dtype, self.device, max_positions=self.max_model_len)
        if weights_dir is None:
            init_dummy(self.model, seed=args.seed)
        else:
            try:
                load_safetensors(self.model, weights_dir)
            except WeightsError as e:
                raise EngineError(str(e)) from None
        tok_dir = args.tokenizer or (str(weights_dir) if weights_dir is not None else
                                     (args.model if Path(args.model).is_dir() else None))
        self.tokenizer: Tokenizer = load_tokenizer(tok_dir, cfg.vocab_size, cfg.eos_token_ids)
        eos = tuple(sorted(set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        if isinstance(self.tokenizer, ByteTokenizer):
            eos = self.tokenizer.eos_token_ids   # a dummy model's EOS is the byte tokenizer's
        self.eos_token_ids = eos

        num_blocks = args.num_kv_blocks or self._auto_kv_blocks()
        if num_blocks < 1:
            raise EngineError("no memory left for the KV cache; lower max_num_batched_tokens or use a larger GPU")
        self.kv = KVCache.for_model(cfg, num_blocks, args.block_size, self.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks, args.block_size, prefix_caching=args.enable_prefix_caching)
        try:
            self.backend = make_backend(args.attention_backend, self.device, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                        overlap=args.attention_overlap, prefill=args.prefill_attention)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.ops = make_ops(self.device, "triton" if self.backend.name == "triton" else "torch")
        self.backend.warm_up(self.kv.k[0], self.kv.v[0], self.kv.scratch_block)
        self.executor = EngineExecutor(
            self.model, self.kv, self.allocator, self.backend, self.ops, Sampler(self.device, args.seed),
            self.eos_token_ids, cuda_graphs=args.cuda_graphs,
            graph_max_batch=min(256, args.max_num_seqs), max_model_len=self.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens, piecewise_cuda_graphs=args.piecewise_cuda_graphs)
        if self.executor.graphs is not None:
            self.executor.graphs.capture_all()   # now, not inside a timed serving step
        if self.executor.piecewise is not None:
            self.executor.piecewise.capture_all()

    def _auto_kv_blocks(self) -> int:
        """``specs.kv_cache_blocks`` on the device's measured memory, with the simulator's
        activation reserve (``specs.default_activation_reserve``) for this engine's
        ``max_num_batched_tokens`` / ``max_num_seqs``, at the dtype actually served."""
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BLOCKS
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        served = replace(self.config.spec, dtype_bytes=self.model.lm_head_weight.element_size())
        reserve = default_activation_reserve(served, self.args.max_num_batched_tokens, self.args.max_num_seqs)
        if self.args.piecewise_cuda_graphs:     # their static buffers and graph pool, captured after the KV
            from fairbatch.engine.piecewise_graph import piecewise_buckets, piecewise_memory_bytes

            buckets = piecewise_buckets(self.args.max_num_batched_tokens)
            if buckets:
                reserve += piecewise_memory_bytes(served, buckets[-1])
        try:
            return kv_cache_blocks(served, total, gpu_memory_utilization=self.args.gpu_memory_utilization,
                                   block_size=self.args.block_size, activation_reserve_bytes=reserve,
                                   resident_bytes=torch.cuda.memory_allocated(self.device), free_bytes=free)
        except ValueError as e:
            raise EngineError(f"no memory left for the KV cache: {e}") from None

    @property
    def gpu_name(self) -> str:
        """GPU preset name for latency models (``h100``, ``h200``, ``a100``); ``h100`` off-GPU."""
        if self.device.type == "cuda":
            return gpu_preset_for(torch.cuda.get_device_name(self.device)) or "h100"
        return "h100"

    def default_latency_model(self) -> LatencyModel:
        from fairbatch.latency.profiles import load_latency_model, shipped_profile
        from fairbatch.latency.roofline import RooflineLatencyModel
        from fairbatch.specs import get_gpu, model_names

        gpu = self.gpu_name
        if self.name in model_names() or shipped_profile(self.name, gpu) is not None:
            return load_latency_model(self.name, gpu)
        return RooflineLatencyModel(replace(self.config.spec, name=self.name), get_gpu(gpu))


class LLM:
    """``LLM("tiny-llama", load_format="dummy").generate(["Hello"], SamplingParams(max_tokens=8))``"""

    def __init__(self, model: str, *, policy: str = "vllm", scheduler_config: SchedulerConfig | None = None,
                 latency_model: LatencyModel | None = None, **engine_kwargs) -> None:
        args = EngineArgs(model, **engine_kwargs)
        if args.load_format == "simulated":     # no model: steps last what latency_model predicts
            from fairbatch.engine.simulated import SimulatedEngine

            self.engine: Engine = SimulatedEngine(args, latency_model)  # type: ignore[assignment]
        else:
            self.engine = Engine(args)
        e = self.engine
        cfg = scheduler_config or SchedulerConfig(
            max_num_batched_tokens=e.args.max_num_batched_tokens, max_num_seqs=e.args.max_num_seqs)
        cfg = replace(cfg, max_model_len=min(cfg.max_model_len, e.max_model_len) if scheduler_config
                      else e.max_model_len)
        self.scheduler_config = cfg
        self.latency_model = latency_model or e.default_latency_model()
        try:
            self.scheduler = make_scheduler(policy, cfg, e.allocator, self.latency_model)
        except ValueError as err:
            raise EngineError(str(err)) from None
        self.instance = Instance(self.scheduler, e.executor, name="engine-0")
        self.policy = policy
        self._next_id = 0

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    # --- public API ------------------------------------------------------------------------
    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, progress: bool = False, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for every prompt, all arriving now; outputs come back in prompt order.

        A prompt is what vLLM's ``LLM.generate`` takes: a string, a list of token ids,
        ``{"prompt": "..."}`` or ``{"prompt_token_ids": [...]}``; or a list of these.
        Raises ``ValueError`` before running anything if a prompt is empty, longer than
        the context, or a dict with keys this engine does not take (multi-modal data)."""
        if use_tqdm is not None:       # vLLM's name for the progress bar
            progress = use_tqdm
        prompts = _prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sps = [sampling_params or SamplingParams()] * len(prompts)
        else:
            sps = list(sampling_params)
            if len(sps) != len(prompts):
                raise ValueError(f"{len(sps)} sampling params for {len(prompts)} prompts")
        # n samples of a prompt are n requests; a seeded one's j-th gets seed + j, as vLLM's
        reqs = [[self.make_request(p, replace(sp, seed=sp.seed + j) if j and sp.seed is not None else sp)
                 for j in range(sp.n)] for p, sp in zip(prompts, sps)]
        outs = iter(self.run([(0.0, r) for group in reqs for r in group], progress=progress))
        results = []
        for group in reqs:
            samples = [next(outs) for _ in group]
            first = samples[0]
            first.outputs = [s.outputs[0] for s in samples]
            for j, c in enumerate(first.outputs):
                c.index = j
            results.append(first)
        return results

    def make_request(self, prompt: str | Sequence[int], sp: SamplingParams, *, slo: SLO | None = None,
                     request_id: str | None = None) -> Request:
        """A scheduler ``Request`` for ``prompt`` (validated; ``arrival`` is set on submission)."""
        prompt = _unwrap_prompt(prompt)
        sp.check_vocab(self.engine.config.vocab_size)
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: it must have at least one token")
        vocab = self.engine.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        a = self.engine.allocator
        check_fits(len(ids), sp.max_tokens, self.scheduler_config.max_model_len, a.block_size, a.num_blocks)
        rid = request_id or f"req-{self._next_id}"
        self._next_id += 1
        cfg = self.scheduler_config
        req = Request(rid, 0.0, len(ids), sp.max_tokens, slo or SLO(cfg.ttft_slo, cfg.tpot_slo),
                      prompt_token_ids=ids, sampling=sp)
        req.block_hashes = prefix_cache_hashes(ids, sp, a.block_size, a.prefix_caching)
        req.user_data = text
        return req

    def run(self, arrivals: Iterable[tuple[float, Request]], *, progress: bool = False,
            on_finish: Callable[[Request], None] | None = None) -> list[RequestOutput]:
        """Drive the instance with a wall clock: each request is submitted at its offset
        (seconds after the start; its ``arrival`` becomes the submission time) and the
        instance steps until all finish. Outputs come back in submission order.

        With ``late="reject"`` in the scheduler config, a request refused because it can
        no longer meet its TTFT (at submission, or while it waits or is part-way through
        its prefill) ends there: its output has ``finish_reason == "rejected"`` and the
        tokens it had (none). ``on_finish`` is called for it too."""
        pending = sorted(arrivals, key=lambda a: a[0])
        order = [r for _, r in pending]
        clock = time.perf_counter
        t0 = clock()
        inst = self.instance
        bar = _Progress(len(order)) if progress else None
        i = 0
        idle_steps = 0
        logprobs = _Logprobs()
        stops = StopStrings(self.tokenizer.decode)
        for req in order:
            stops.watch(req)

        def done(req: Request) -> None:
            if on_finish is not None:
                on_finish(req)
            if bar is not None:
                bar.advance()

        ahead = StepAhead(inst, lambda: clock() - t0) if self.engine.args.async_scheduling else None
        try:
            while i < len(pending) or inst.has_work() or (ahead is not None and ahead.in_flight):
                now = clock() - t0
                while i < len(pending) and pending[i][0] <= now:
                    req = pending[i][1]
                    req.set_arrival(now)
                    inst.add(req, now)
                    if req.state is RequestState.REJECTED:   # late=reject: hopeless on arrival
                        done(req)
                    i += 1
                if ahead is not None and (ahead.in_flight or inst.has_work()):
                    plan, settled = ahead.cycle(now)
                    for req in plan.rejected if plan is not None else ():
                        done(req)
                    if settled is not None:
                        self._after_step(settled.plan, settled.result, settled.finished, settled.end,
                                         logprobs, stops, done)
                    elif plan is not None and not plan.chunks:
                        idle_steps = 0 if plan.rejected else idle_steps + 1
                        self._check_progress(idle_steps)
                    continue
                if not inst.has_work():
                    if i < len(pending):        # else every request has ended (the last ones refused)
                        time.sleep(max(0.0, min(pending[i][0] - now, 0.05)))
                    continue
                plan, result = inst.begin_step(now)
                if result.logprobs or result.prompt_logprobs:
                    logprobs.add(result)
                for req in plan.rejected:       # refused while waiting or part-way through its prefill
                    done(req)
                # tokens are stamped at the real end of the step (scheduling included)
                end = clock() - t0
                finished = inst.end_step(plan, result, end)
                if plan.is_empty:
                    idle_steps = 0 if plan.rejected else idle_steps + 1
                    self._check_progress(idle_steps)
                    continue
                idle_steps = 0
                self._after_step(plan, result, finished, end, None, stops, done)
        finally:
            if bar is not None:
                bar.close()
        outputs = [self.output_of(r, t0, logprobs) for r in order]
        for req, out in zip(order, outputs):
            stops.apply(req, out)
        return outputs

    def _after_step(self, plan: StepPlan, result: StepResult, finished: list[Request], end: float,
                    logprobs: "_Logprobs | None", stops: StopStrings, done: Callable[[Request], None]) -> None:
        """A step's tokens are recorded: logprobs kept, stop strings searched, finished
        requests reported."""
        if logprobs is not None and (result.logprobs or result.prompt_logprobs):
            logprobs.add(result)
        if stops.watching:
            for req in stops.after_step([r for r, _ in plan.chunks], lambda rid: self.instance.abort(rid, end)):
                done(req)
        for req in finished:
            done(req)

    def _check_progress(self, idle_steps: int) -> None:
        if idle_steps > 10000 and not self.scheduler.num_running:
            raise RuntimeError(f"the {self.policy} scheduler makes no progress "
                               f"({self.scheduler.num_waiting} requests waiting)")

    def output_of(self, req: Request, t0: float = 0.0, logprobs: "_Logprobs | None" = None) -> RequestOutput:
        sp = req.sampling if isinstance(req.sampling, SamplingParams) else None
        lp = plp = None
        if sp is not None and sp.logprobs is not None:
            lp = logprobs.sampled.get(req.request_id, []) if logprobs else []
        if sp is not None and sp.prompt_logprobs is not None:
            plp = logprobs.prompt.get(req.request_id, [None]) if logprobs else [None]
        text = self.tokenizer.decode(req.output_token_ids)
        stop_reason = None
        if req.finish_reason == "stop" and sp is not None and req.output_token_ids \
                and req.output_token_ids[-1] in sp.stop_token_ids:
            stop_reason = req.output_token_ids[-1]
        completion = CompletionOutput(
            0, text, list(req.output_token_ids), sum(e[0][1] for e in lp) if lp is not None else None,
            logprob_dicts(lp, self.tokenizer.decode), req.finish_reason, stop_reason)
        return RequestOutput(
            logprobs=lp, prompt_logprobs=plp, outputs=[completion],
            request_id=req.request_id, prompt=req.user_data if isinstance(req.user_data, str) else None,
            prompt_token_ids=list(req.prompt_token_ids or []), text=self.tokenizer.decode(req.output_token_ids),
            token_ids=list(req.output_token_ids), finish_reason=req.finish_reason, arrival=req.arrival,
            first_token_time=req.first_token_time, finish_time=req.finish_time,
            num_preemptions=req.num_preemptions, num_cached_tokens=req.num_cached_tokens)


PromptInput = "str | Sequence[int] | dict[str, Any]"


def _prompt_list(prompts: Any) -> list[Any]:
    """One prompt or a list of them -> a list (a list of ints is one token-id prompt, as
    in vLLM)."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def _unwrap_prompt(prompt: Any) -> str | Sequence[int]:
    """vLLM's ``TextPrompt`` / ``TokensPrompt`` dicts -> a string or token ids."""
    if not isinstance(prompt, dict):
        return prompt
    extra = set(prompt) - {"prompt", "prompt_token_ids"}
    if extra:
        raise ValueError(f"prompt keys not supported: {', '.join(sorted(extra))} "
                         f"(this engine takes 'prompt' or 'prompt_token_ids')")
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")


class _Logprobs:
    """Logprob entries the steps of one ``run`` reported, per request: the sampled
    tokens', and the prompt's (position 0 is None; a recompute's repeats are dropped)."""

    def __init__(self) -> None:
        self.sampled: dict[str, list] = {}
        self.prompt: dict[str, list] = {}

    def add(self, result: Any) -> None:
        for rid, entries in (result.logprobs or {}).items():
            self.sampled.setdefault(rid, []).append(entries)
        for rid, (lo, entries) in (result.prompt_logprobs or {}).items():
            acc = self.prompt.setdefault(rid, [None])
            skip = len(acc) - lo
            if skip >= 0:
                acc.extend(entries[skip:])


class _Progress:
    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self._p = Progress(transient=False)
        self._p.start()
        self._task = self._p.add_task("generating", total=total)

    def advance(self) -> None:
        self._p.advance(self._task)

    def close(self) -> None:
        self._p.stop()
