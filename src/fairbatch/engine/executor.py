"""EngineExecutor: the engine's ``Executor`` for ``fairbatch.instance.Instance``.

``execute(plan)`` runs one flattened forward pass for the plan's chunks, samples a token
for every request whose chunk reached the end of its known tokens, and reports the
measured wall time (device synchronised). Token bookkeeping is the scheduler's
(``on_step_end``); the executor only reads ``Request`` state, never changes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fairbatch.engine.attention import AttentionBackend
from fairbatch.engine.batch import BatchBuilder, StepInputs
from fairbatch.engine.cuda_graph import GraphStep
from fairbatch.engine.kv_cache import KVCache
from fairbatch.engine.logits_ops import logprob_entries
from fairbatch.engine.model import CausalLM
from fairbatch.engine.ops import TorchOps
from fairbatch.engine.sampler import Sampler, params_of
from fairbatch.kv import BlockAllocator
from fairbatch.plan import StepPlan, StepResult
from fairbatch.request import Request, RequestState

PROMPT_LOGPROB_SLICE = 512      # prompt positions scored per logits matmul


@dataclass
class PreparedStep:
    """A step's host work, done (``EngineExecutor.prepare``)."""

    plan: StepPlan
    t0: float
    prompt_lp: list[tuple[Request, int, int, int]] | None
    pending: list[tuple[int, Request, int]]    # (index in input_ids, request, output index) in flight
    input_ids: np.ndarray                       # the host input ids ``pending`` indexes
    graph: GraphStep | None = None              # a whole-step graph's filled buffer, or
    host: tuple | None = None                   # the eager step's (arrays, requests, max q, max seq)


@dataclass
class LaunchedStep:
    """A step running on the device (``EngineExecutor.launch``)."""

    t0: float
    reqs: list[Request]
    stop_sets: list[frozenset[int]]
    tokens: torch.Tensor | None                 # sampled, on the device
    logits: torch.Tensor | None                 # kept when a request wants logprobs
    prompt_logprobs: dict[str, tuple[int, list]] | None


class EngineExecutor:
    def __init__(self, model: CausalLM, kv: KVCache, allocator: BlockAllocator, backend: AttentionBackend,
                 ops: TorchOps, sampler: Sampler, eos_token_ids: tuple[int, ...] = (), *,
                 cuda_graphs: bool = False, graph_max_batch: int = 256, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 8192, piecewise_cuda_graphs: bool = False) -> None:
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
        self.piecewise = None      # steps the whole-step graphs leave: piecewise_graph.py
        if piecewise_cuda_graphs and self.device.type == "cuda":
            from fairbatch.engine.piecewise_graph import CudaGraphPieces, PiecewiseGraphs, piecewise_buckets

            self.piecewise = PiecewiseGraphs(model, kv, backend, ops, piecewise_buckets(max_num_batched_tokens),
                                             CudaGraphPieces(self.device))
        self.steps = 0

    # --- Executor protocol -----------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        prepared = self.prepare(plan)
        launched = self.launch(prepared)
        launched.t0 = prepared.t0           # the step's host work counts in its time here
        return self.collect(launched)

    # --- in three parts, for planning one step ahead (OverlappingExecutor) ----------------
    def prepare(self, plan: StepPlan) -> "PreparedStep":
        """The step's host work, from the requests' state now: a graph's host buffer
        filled, or the eager step's arrays. Ids of tokens still in flight are left to
        ``launch``."""
        t0 = time.perf_counter()
        prompt_lp = self._prompt_logprob_rows(plan)
        pending: list[tuple[int, Request, int]] = []
        if self.graphs is not None and prompt_lp is None:    # prompt logprobs need every hidden row
            step = self.graphs.prepare(plan, pending)
            if step is not None:
                return PreparedStep(plan, t0, prompt_lp, pending, step.input_ids, graph=step)
        arrays, reqs, max_q, max_s = self.builder.host_arrays(plan, pending)
        return PreparedStep(plan, t0, prompt_lp, pending, arrays["input_ids"], host=(arrays, reqs, max_q, max_s))

    def launch(self, prepared: "PreparedStep") -> "LaunchedStep":
        """Set the in-flight token ids (known by now), start the forward pass and the
        sampling; does not wait for the device."""
        t0 = time.perf_counter()
        ids = prepared.input_ids
        for i, req, j in prepared.pending:
            out = req.output_token_ids
            if j >= len(out):
                raise RuntimeError(f"request {req.request_id}: output token {j} launched before its id was known")
            ids[i] = out[j]
        hidden = None
        if prepared.graph is not None:
            logits, reqs = self.graphs.replay(prepared.graph)
        else:
            inputs = self.builder.to_device(*prepared.host)
            hidden = self.forward(inputs)
            reqs = inputs.sample_requests
            if reqs:
                logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
            else:
                logits = hidden[:0, :0]
        plan = prepared.plan
        prompt_out = self._prompt_logprobs(plan, prepared.prompt_lp, hidden) if prepared.prompt_lp is not None else None
        stop_sets = [self._stop_set(r) for r in reqs]
        tokens = self.sampler.sample_tensor(logits, reqs, stop_sets) if reqs else None
        keep = logits if reqs and not all(params_of(r).plain for r in reqs) else None   # for logprobs
        return LaunchedStep(t0, reqs, stop_sets, tokens, keep, prompt_out)

    def collect(self, launched: "LaunchedStep") -> StepResult:
        """Wait for a launched step; its tokens, stops and logprobs."""
        reqs, stop_sets = launched.reqs, launched.stop_sets
        tokens: list[int] = launched.tokens.tolist() if launched.tokens is not None else []
        logprobs = self._sample_logprobs(launched.logits, reqs, tokens) if launched.logits is not None else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        duration = time.perf_counter() - launched.t0
        token_ids: dict[str, int] = {}
        stopped: set[str] = set()
        for req, tok, stops in zip(reqs, tokens, stop_sets):
            rid = req.request_id
            token_ids[rid] = tok
            if tok in stops:
                stopped.add(rid)
        self.steps += 1
        return StepResult(duration, token_ids, stopped, logprobs, launched.prompt_logprobs)

    def release(self, request: Request) -> None:
        self.builder.release(request)
        self._stops.pop(request.request_id, None)

    # --- internals -------------------------------------------------------------------------
    def _stop_set(self, req: Request) -> frozenset[int]:
        s = self._stops.get(req.request_id)
        if s is None:
            p = params_of(req)
            s = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
            if req.state is RequestState.RUNNING:   # not one that stopped while its next step was planned
                self._stops[req.request_id] = s
        return s

    # --- logprobs (only for requests that ask) ------------------------------------------------
    def _sample_logprobs(self, logits: torch.Tensor, reqs: list[Request], tokens: list[int]
                         ) -> dict[str, list] | None:
        """The sampled tokens' logprobs from the raw logits (vLLM's default
        ``logprobs_mode``: before penalties, temperature and filters)."""
        params = [params_of(r) for r in reqs]
        if all(p.plain for p in params):
            return None
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return None
        idx = torch.tensor(want, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        entries = logprob_entries(lp, [tokens[i] for i in want], [params_of(reqs[i]).logprobs for i in want])
        return {reqs[i].request_id: e for i, e in zip(want, entries)}

    def _prompt_logprob_rows(self, plan: StepPlan) -> list[tuple[Request, int, int, int]] | None:
        """For each chunk of a request that wants prompt logprobs: (request, first hidden
        row of the chunk, first and last+1 prompt position it scores). The hidden state at
        position ``p`` scores prompt token ``p + 1``."""
        chunks = plan.chunks
        if all(params_of(req).plain for req, _ in chunks):
            return None
        out = []
        row = 0
        for req, k in chunks:
            p = params_of(req).prompt_logprobs
            c = req.num_computed
            if p is not None:
                lo, hi = c + 1, min(c + k, req.prompt_len - 1) + 1
                if lo < hi:
                    out.append((req, row, lo, hi))
            row += k
        return out or None

    def _prompt_logprobs(self, plan: StepPlan, rows: list[tuple[Request, int, int, int]],
                         hidden: torch.Tensor | None) -> dict[str, tuple[int, list]]:
        out: dict[str, tuple[int, list]] = {}
        assert hidden is not None
        for req, row0, lo, hi in rows:
            k = params_of(req).prompt_logprobs
            entries: list = []
            # slices bound the [rows, vocab] float32 temporaries of a long prompt chunk
            for a in range(lo, hi, PROMPT_LOGPROB_SLICE):
                b = min(hi, a + PROMPT_LOGPROB_SLICE)
                start = row0 + (a - 1 - req.num_computed)
                h = hidden[start:start + (b - a)]
                lp = torch.log_softmax(self.model.compute_logits(h).float(), dim=-1)
                entries.extend(logprob_entries(lp, req.prompt_token_ids[a:b], [k] * (b - a)))
            out[req.request_id] = (lo, entries)
        return out

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Final hidden states; from the piecewise graphs, a static buffer's view that the
        next step overwrites (callers use it within the step)."""
        if self.piecewise is not None:
            hidden = self.piecewise.try_forward(inputs)
            if hidden is not None:
                return hidden
        return self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv, self.backend, self.ops)

    @torch.inference_mode()
    def logits_of_all_tokens(self, plan: StepPlan) -> torch.Tensor:
        """Float32 logits of every token the plan computes, ``[T, vocab]``, in plan order
        (tests compare them with a reference; writes KV like a real step, samples nothing)."""
        inputs = self.builder.build(plan)
        return self.model.compute_logits(self.forward(inputs))
