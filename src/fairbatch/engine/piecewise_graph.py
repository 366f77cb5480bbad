"""Piecewise CUDA graphs: everything but attention replayed per token bucket.

The whole-step graphs (``cuda_graph.py``) stop at 256 tokens: above that, attention grids
sized for a bucket's worst case cost more than the launches they save. A step of up to
``max_num_batched_tokens`` (at most ``PIECEWISE_BUCKETS[-1]``) that they leave eager runs
here instead, cut at every attention call into ``num_layers + 1`` pieces:

    piece 0        embed, layer 0 pre_attention
    piece i        layer i-1 post_attention, layer i pre_attention     (0 < i < num_layers)
    piece L        layer L-1 post_attention, final norm

(``CausalLM.pre_attention`` / ``post_attention``: the functions the eager forward calls.)
Each piece is captured once per token bucket ``t`` over static buffers of ``t`` rows, and
attention runs eagerly between them on the step's real ``T <= t`` tokens and metadata, so
it launches grids for what the step holds, not for the bucket's worst case.

Every piece reads its inputs from, and copies its outputs into, buffers shared by all
buckets (each bucket uses the first ``t`` rows), so nothing a piece allocates outlives it:
the temporaries of every graph of every bucket come from one shared pool, sized by the
largest piece. Padding rows ``T..t`` compute garbage that stays in their own rows
(norms, projections and the MLP are row-wise); their K/V go to the KV cache's scratch
block, so they never touch a live request.

Memory (``piecewise_memory_bytes``), llama-3-8b bf16 at 2048 tokens: 64 MiB of static
buffers plus at most ~256 MiB of pool (the MLP's gate/up and SiLU outputs dominate).
The price of the static buffers is three copies a layer (q, residual, attention output):
~3 GB of traffic at 2048 tokens, an estimated ~1 ms of a ~45 ms step.

Capture is injectable (``PieceCapture``): ``CudaGraphPieces`` on the GPU, ``EagerPieces``
(runs the same pieces over the same padded buffers, no graph) for CPU tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from fairbatch.engine.attention import AttentionBackend
    from fairbatch.engine.batch import StepInputs
    from fairbatch.engine.kv_cache import KVCache
    from fairbatch.engine.model import CausalLM
    from fairbatch.engine.ops import TorchOps
    from fairbatch.specs import ModelSpec

# Padding costs GEMM time (~0.025 ms a token for an 8B model once compute-bound), so the
# buckets are close: 128 apart up to 1024 (at most 1/3 padding at 384, 1/8 from 1024),
# 256 apart to 2048. Past 2048 tokens a step computes for ~40 ms and the ~5-7 ms launch
# floor matters less than the pool memory a larger bucket would hold.
PIECEWISE_BUCKETS = (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)

Piece = Callable[[], None]


def piecewise_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """The buckets a step budget can use; a budget under the largest bucket is a bucket
    of its own (a full step then pads nothing)."""
    kept = [b for b in PIECEWISE_BUCKETS if b < max_num_batched_tokens]
    if max_num_batched_tokens <= PIECEWISE_BUCKETS[-1]:
        kept.append(max_num_batched_tokens)
    return tuple(kept)


def piecewise_memory_bytes(spec: ModelSpec, max_tokens: int) -> int:
    """Static buffers plus an upper estimate of the shared pool: one piece's temporaries
    at the largest bucket (gate/up, SiLU, a few hidden-size rows, q/k/v)."""
    static = max_tokens * (2 * spec.q_size + 2 * spec.hidden_size) * spec.dtype_bytes + 3 * max_tokens * 4
    per_token = 3 * spec.intermediate_size + 4 * spec.hidden_size + spec.q_size + 2 * spec.kv_size
    return static + max_tokens * per_token * spec.dtype_bytes


class PieceCapture(Protocol):
    def capture(self, piece: Piece) -> Piece:
        """Something that redoes ``piece``'s work over the same buffers when called."""
        ...


class EagerPieces:
    """No capture: every replay runs the piece's Python (CPU tests, debugging)."""

    def capture(self, piece: Piece) -> Piece:
        return piece


class CudaGraphPieces:
    """One ``torch.cuda.CUDAGraph`` per piece, all in one memory pool. Sharing the pool is
    safe because a piece's outputs are copied into static buffers before it ends: no graph
    leaves anything alive in the pool for another to read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.warm_stream = torch.cuda.Stream(device)
        self.pool = None
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def capture(self, piece: Piece) -> Piece:
        here = torch.cuda.current_stream(self.device)
        self.warm_stream.wait_stream(here)
        with torch.cuda.stream(self.warm_stream):   # compile Triton kernels, warm cuBLAS, off the graph
            piece()
        here.wait_stream(self.warm_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            piece()
        self.pool = graph.pool()
        self.graphs.append(graph)
        return graph.replay


class PiecewiseGraphs:
    def __init__(self, model: CausalLM, kv: KVCache, backend: AttentionBackend, ops: TorchOps,
                 buckets: tuple[int, ...], capture: PieceCapture) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"piecewise buckets must be increasing and non-empty, got {buckets}")
        self.model, self.kv, self.backend, self.ops = model, kv, backend, ops
        self.buckets = buckets
        self.capture = capture
        cfg = model.config
        n, dev, dt = buckets[-1], model.device, model.dtype
        # inputs of the pieces, shared by every bucket (bucket t uses rows :t)
        self.input_ids = torch.zeros(n, dtype=torch.int32, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int32, device=dev)
        # a piece's outputs, the next one's inputs
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dt, device=dev)
        self.attn_out = torch.zeros(n, cfg.q_size, dtype=dt, device=dev)
        self.residual = torch.zeros(n, cfg.hidden_size, dtype=dt, device=dev)
        self.hidden = torch.zeros(n, cfg.hidden_size, dtype=dt, device=dev)
        self.pieces: dict[int, list[Piece]] = {}
        self.replays = 0

    @property
    def scratch_slot(self) -> int:
        return self.kv.scratch_block * self.kv.block_size

    def bucket_for(self, num_tokens: int) -> int | None:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        return None

    @torch.inference_mode()
    def capture_all(self) -> None:
        # largest first: the pool grows once, smaller buckets reuse what it reserved
        for t in reversed(self.buckets):
            self._pieces_of(t)

    @torch.inference_mode()
    def try_forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The final hidden states of the step's ``T`` tokens (a view of a static buffer,
        valid until the next step), or None when no bucket holds the step."""
        meta = inputs.meta
        T = meta.num_tokens
        t = self.bucket_for(T) if T else None
        if t is None:
            return None
        pieces = self._pieces_of(t)
        self.input_ids[:T].copy_(inputs.input_ids)
        self.positions[:T].copy_(inputs.positions)
        self.slot_mapping[:T].copy_(meta.slot_mapping)
        # a previous step's real slots would let padding overwrite a live request's KV;
        # padding's ids and positions may stay stale (any in-range value does)
        self.slot_mapping[T:t].fill_(self.scratch_slot)
        q, attn_out, kv = self.q[:T], self.attn_out[:T], self.kv
        for i, piece in enumerate(pieces[:-1]):
            piece()
            o = self.backend.forward(q, kv.k[i], kv.v[i], meta)
            attn_out.copy_(o.reshape(T, -1))
        pieces[-1]()
        self.replays += 1
        return self.hidden[:T]

    def _pieces_of(self, t: int) -> list[Piece]:
        pieces = self.pieces.get(t)
        if pieces is None:
            # capturing runs the pieces (warm-up): after a step, rows :t still hold its
            # slots, and those K/V writes would land in live requests' blocks
            self.slot_mapping[:t].fill_(self.scratch_slot)
            pieces = [self.capture.capture(p) for p in self._piece_functions(t)]
            self.pieces[t] = pieces
        return pieces

    def _piece_functions(self, t: int) -> list[Piece]:
        m, kv, ops = self.model, self.kv, self.ops
        ids, pos, slots = self.input_ids[:t], self.positions[:t], self.slot_mapping[:t]
        q, attn_out, residual, hidden = self.q[:t], self.attn_out[:t], self.residual[:t], self.hidden[:t]

        def first() -> None:
            q_i, r = m.pre_attention(0, m.embed(ids), None, pos, slots, kv, ops)
            q.copy_(q_i)
            residual.copy_(r)

        def between(i: int) -> Piece:
            def piece() -> None:
                h, r = m.post_attention(i - 1, attn_out, residual, ops)
                q_i, r = m.pre_attention(i, h, r, pos, slots, kv, ops)
                q.copy_(q_i)
                residual.copy_(r)
            return piece

        def last() -> None:
            h, r = m.post_attention(m.config.num_layers - 1, attn_out, residual, ops)
            hidden.copy_(m.final_norm(h, r, ops))

        return [first, *(between(i) for i in range(1, m.config.num_layers)), last]
