"""EngineExecutor: the engine's ``Executor`` for ``fairbatch.instance.Instance``.

``execute(plan)`` runs one flattened forward pass for the plan's chunks, samples a token
for every request whose chunk reached the end of its known tokens, and reports the
measured wall time (device synchronised). Token bookkeeping is the scheduler's
(``on_step_end``); the executor only reads ``Request`` state, never changes it.
"""

from __future__ import annotations

import time

import torch

from fairbatch.engine.attention import AttentionBackend
from fairbatch.engine.batch import BatchBuilder, StepInputs
from fairbatch.engine.kv_cache import KVCache
from fairbatch.engine.model import CausalLM
from fairbatch.engine.ops import TorchOps
from fairbatch.engine.sampler import Sampler, params_of
from fairbatch.kv import BlockAllocator
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request


class EngineExecutor:
    def __init__(self, model: CausalLM, kv: KVCache, allocator: BlockAllocator, backend: AttentionBackend,
                 ops: TorchOps, sampler: Sampler, eos_token_ids: tuple[int, ...] = (), *,
                 cuda_graphs: bool = False, graph_max_batch: int = 256, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 8192) -> None:
        if kv.num_blocks != allocator.num_blocks or kv.block_size != allocator.block_size:
            raise ValueError(f"KV cache ({kv.num_blocks} x {kv.block_size}) and block allocator "
                             f"({allocator.num_blocks} x {allocator.block_size}) disagree")
        self.model = model
        self.kv = kv
        self.allocator = allocator
        self.backend = backend
        self.ops = ops
        self.sampler = sampler
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = model.device
        self.builder = BatchBuilder(allocator, backend, self.device)
        self._stops: dict[str, frozenset[int]] = {}
        self.max_num_batched_tokens = max_num_batched_tokens
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and backend.name == "triton":
            from fairbatch.engine.cuda_graph import StepGraphs

            self.graphs = StepGraphs(self, graph_max_batch, max_model_len or model.config.max_position_embeddings)
        self.steps = 0

    # --- Executor protocol -----------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        logits, reqs = self._logits_for_sampling(plan)
        tokens = self.sampler.sample(logits, reqs) if reqs else []
        if cuda:
            torch.cuda.synchronize(self.device)
        duration = time.perf_counter() - t0
        token_ids: dict[str, int] = {}
        stopped: set[str] = set()
        for req, tok in zip(reqs, tokens):
            rid = req.request_id
            token_ids[rid] = tok
            if tok in self._stop_set(req):
                stopped.add(rid)
        self.steps += 1
        return StepResult(duration, token_ids, stopped)

    def release(self, request: Request) -> None:
        self.builder.release(request)
        self._stops.pop(request.request_id, None)

    # --- internals -------------------------------------------------------------------------
    def _stop_set(self, req: Request) -> frozenset[int]:
        s = self._stops.get(req.request_id)
        if s is None:
            p = params_of(req)
            s = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
            self._stops[req.request_id] = s
        return s

    def _logits_for_sampling(self, plan: StepPlan) -> tuple[torch.Tensor, list[Request]]:
        if self.graphs is not None:
            out = self.graphs.try_run(plan)
            if out is not None:
                return out
        inputs = self.builder.build(plan)
        hidden = self.forward(inputs)
        if not inputs.sample_requests:
            return hidden[:0, :0], []
        rows = hidden.index_select(0, inputs.logits_indices)
        return self.model.compute_logits(rows), inputs.sample_requests

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        return self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv, self.backend, self.ops)

    @torch.inference_mode()
    def logits_of_all_tokens(self, plan: StepPlan) -> torch.Tensor:
        """Float32 logits of every token the plan computes, ``[T, vocab]``, in plan order
        (tests compare them with a reference; writes KV like a real step, samples nothing)."""
        inputs = self.builder.build(plan)
        return self.model.compute_logits(self.forward(inputs))
