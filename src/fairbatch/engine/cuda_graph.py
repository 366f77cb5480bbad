"""CUDA graphs for decode-only steps and for mixed steps under ``MIXED_MAX_TOKENS`` tokens.

Launching a step's ~300 kernels from Python costs ~15 ms on an H100 host, more than a
small step runs on the GPU (a Llama-3-8B decode streams its 15 GB of weights in ~5 ms).
Such steps therefore replay a graph captured over static input buffers: the host packs
the step's indices into one pinned buffer and the replay starts with a single copy.

- Decode-only steps (every chunk one token): one graph per batch-size bucket.
- Mixed steps (prefill chunks with or without decodes): one graph per token bucket;
  the attention grids are sized for the bucket's worst case and the unused programs
  (and the padding tokens) are steered to *pad sequences*: one token each, in the KV
  cache's scratch block, attending only to itself. Their outputs land in padding rows.

The graphs stop at the final hidden states; logits of the sampling rows are computed
eagerly (keeping vocabulary-sized outputs out of every bucket's static memory). Larger
steps may replay piecewise graphs instead (``piecewise_graph.py``, off by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fairbatch.engine.attention import AttentionMetadata
from fairbatch.engine.batch import aligned
from fairbatch.plan import StepPlan
from fairbatch.request import Request

if TYPE_CHECKING:
    from fairbatch.engine.executor import EngineExecutor

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Mixed steps only while the weights dominate: measured on an H100 (Llama-3-8B), a padded
# 512-token step replayed at 17.7 ms against 13.7 ms eager, while 128 tokens gained 2.4 ms.
MIXED_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIXED_MAX_TOKENS = MIXED_BUCKETS[-1]
MIXED_MAX_PREFILLS = 16          # prefill chunks a mixed graph has attention programs for


class _Graph:
    """Static buffers (one packed int32 buffer on the device, two pinned on the host) and a
    captured graph. Steps fill the host buffers in turn: with scheduling one step ahead,
    the next step is filled while the last one's copy may still be in flight."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.layout: dict[str, tuple[int, tuple[int, ...]]] = {}
        off = 0
        for name, shape in shapes.items():
            self.layout[name] = (off, shape)
            off += aligned(int(np.prod(shape)))      # 16-byte aligned views: one Triton specialization
        self.hosts = [torch.zeros(off, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.hosts_np = [h.numpy() for h in self.hosts]
        self.fill = 0                                 # the host buffer ``h`` writes
        self.dev = torch.zeros(off, dtype=torch.int32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None

    def h(self, name: str) -> np.ndarray:
        off, shape = self.layout[name]
        return self.hosts_np[self.fill][off:off + int(np.prod(shape))].reshape(shape)

    def both(self, fill: Callable[[], None]) -> None:
        """Run ``fill`` (which writes through ``h``) on both host buffers."""
        for _ in range(2):
            fill()
            self.fill ^= 1


@dataclass
class GraphStep:
    """A step filled into one of a graph's host buffers, ready to replay."""

    graph: _Graph
    buffer: int
    rows: list[int]                       # hidden-state rows that sample
    reqs: list[Request]                   # their requests
    input_ids: np.ndarray                 # the filled buffer's input ids (in-flight tokens to set)
    mixed: bool

    def d(self, name: str) -> torch.Tensor:
        off, shape = self.layout[name]
        return self.dev[off:off + int(np.prod(shape))].view(shape)


class StepGraphs:
    def __init__(self, ex: EngineExecutor, max_batch: int, max_model_len: int, mixed: bool = True) -> None:
        self.ex = ex
        self.block_size = ex.kv.block_size
        self.width = -(-max_model_len // self.block_size)
        self.decode_buckets = [b for b in DECODE_BUCKETS if b <= max_batch]
        if not self.decode_buckets or self.decode_buckets[-1] < max_batch:
            self.decode_buckets.append(max_batch)
        self.max_batch = max_batch
        self.mixed = mixed and hasattr(ex.backend, "prefill_block_q")
        self.max_tokens = min(MIXED_MAX_TOKENS, ex.max_num_batched_tokens) if self.mixed else 0
        self.mixed_buckets = [b for b in MIXED_BUCKETS if b <= max(16, self.max_tokens)]
        self.decode_graphs: dict[int, _Graph] = {}
        self.mixed_graphs: dict[int, _Graph] = {}
        self.pool = None
        self.replays = 0
        self.mixed_replays = 0

    def capture_all(self) -> None:
        # largest first: smaller graphs then reuse the pool memory the largest reserved
        for b in reversed(self.mixed_buckets if self.mixed else []):
            self._mixed_graph(b)
        for b in reversed(self.decode_buckets):
            self._decode_graph(b)

    def try_run(self, plan: StepPlan) -> tuple[torch.Tensor, list[Request]] | None:
        step = self.prepare(plan)
        return self.replay(step) if step is not None else None

    def prepare(self, plan: StepPlan, pending: list[tuple[int, Request, int]] | None = None) -> GraphStep | None:
        """Fill a graph's next host buffer for ``plan`` (None: no graph covers it).
        ``pending`` as in ``BatchBuilder.host_arrays``."""
        chunks = plan.chunks
        n = len(chunks)
        if n == 0:
            return None
        T = 0
        for _, k in chunks:
            T += k
        if T == n and n <= self.max_batch:
            g = self._decode_graph(next(b for b in self.decode_buckets if b >= n))
            rows, reqs = self._fill_decode(g, chunks, pending)
            mixed = False
        elif self.mixed and T < self.max_tokens:
            bucket = next(b for b in self.mixed_buckets if b > T)    # > : at least one pad token
            g = self._mixed_graph(bucket)
            filled = self._fill_mixed(g, bucket, plan, pending)
            if filled is None:
                return None
            rows, reqs = filled
            mixed = True
        else:
            return None
        step = GraphStep(g, g.fill, rows, reqs, g.h("input_ids"), mixed)
        g.fill ^= 1
        return step

    def replay(self, step: GraphStep) -> tuple[torch.Tensor, list[Request]]:
        g = step.graph
        if step.mixed:
            self.mixed_replays += 1
        else:
            self.replays += 1
        g.dev.copy_(g.hosts[step.buffer], non_blocking=True)
        # the sampling rows from pinned memory, before the replay: a copy from pageable
        # memory may wait for the stream, which would make the launch wait for the step
        idx = (torch.from_numpy(np.asarray(step.rows, dtype=np.int64)).pin_memory().to(g.hidden.device, non_blocking=True)
               if step.reqs else None)
        g.graph.replay()
        if idx is None:
            return g.hidden[:0, :0], step.reqs
        return self.ex.model.compute_logits(g.hidden.index_select(0, idx)), step.reqs

    # --- decode-only -----------------------------------------------------------------------
    def _decode_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        return {"input_ids": (b,), "positions": (b,), "slot_mapping": (b,), "query_start_loc": (b + 1,),
                "seq_lens": (b,), "block_tables": (b, self.width), "dec_seq": (b,), "dec_off": (b,)}

    def _fill_decode(self, g: _Graph, chunks: list[tuple[Request, int]],
                     pending: list[tuple[int, Request, int]] | None = None) -> tuple[list[int], list[Request]]:
        B = self.block_size
        scratch = self.ex.kv.scratch_block
        ids, pos, slots, lens, bt = (g.h(k) for k in ("input_ids", "positions", "slot_mapping", "seq_lens",
                                                      "block_tables"))
        n = len(chunks)
        tables = self.ex.builder.tables
        alloc = self.ex.allocator
        rows: list[int] = []
        reqs: list[Request] = []
        for i, (req, _) in enumerate(chunks):
            c = req.num_computed
            plen = req.prompt_len
            if c < plen:
                ids[i] = req.prompt_token_ids[c]
            elif c - plen < len(req.output_token_ids):
                ids[i] = req.output_token_ids[c - plen]
            elif pending is not None:
                ids[i] = 0                              # in flight: set at launch
                pending.append((i, req, c - plen))
            else:
                raise RuntimeError(f"request {req.request_id}: the id of output token {c - plen} is not known")
            pos[i] = c
            row = tables.get(req.request_id, alloc.block_table(req.request_id))
            nb = c // B + 1
            bt[i, :nb] = row[:nb]
            slots[i] = row[c // B] * B + c % B
            lens[i] = c + 1
            if c + 1 == plen + req.generated:
                rows.append(i)
                reqs.append(req)
        # padding rows: their own token in the scratch block, nothing else
        ids[n:] = 0
        pos[n:] = 0
        slots[n:] = scratch * B
        lens[n:] = 1
        bt[n:, 0] = scratch
        return rows, reqs

    def _decode_graph(self, b: int) -> _Graph:
        g = self.decode_graphs.get(b)
        if g is None:
            g = _Graph(self._decode_shapes(b), self.ex.device)
            def constants() -> None:
                g.h("query_start_loc")[:] = np.arange(b + 1)
                g.h("dec_seq")[:] = np.arange(b)
                self._fill_decode(g, [])
            g.both(constants)
            meta = self._meta(g, b, b, {"dec_seq": b, "pre_seq": 0})
            self._capture(g, meta)
            self.decode_graphs[b] = g
        return g

    # --- mixed -----------------------------------------------------------------------------
    def _prefill_programs(self, bucket: int) -> int:
        return bucket // self.ex.backend.prefill_block_q + MIXED_MAX_PREFILLS

    def _mixed_shapes(self, t: int) -> dict[str, tuple[int, ...]]:
        p = self._prefill_programs(t)
        return {"input_ids": (t,), "positions": (t,), "slot_mapping": (t,), "query_start_loc": (t + 1,),
                "seq_lens": (t,), "block_tables": (t, self.width), "dec_seq": (t,), "dec_off": (t,),
                "pre_seq": (p,), "pre_off": (p,)}

    def _pad_mixed(self, g: _Graph, t: int, T: int, S: int) -> None:
        """Tokens T.. and sequences S.. become pad sequences; spare programs point to the last."""
        B = self.block_size
        scratch = self.ex.kv.scratch_block
        npad = t - T
        g.h("input_ids")[T:] = 0
        g.h("positions")[T:] = 0
        g.h("slot_mapping")[T:] = scratch * B
        qsl = g.h("query_start_loc")
        qsl[S + 1:S + 1 + npad] = np.arange(T + 1, t + 1)
        qsl[S + 1 + npad:] = t
        g.h("seq_lens")[S:] = 1
        g.h("block_tables")[S:, 0] = scratch

    def _fill_mixed(self, g: _Graph, t: int, plan: StepPlan, pending: list[tuple[int, Request, int]] | None = None
                    ) -> tuple[list[int], list[Request]] | None:
        mark = len(pending) if pending is not None else 0
        arrays, reqs, _, _ = self.ex.builder.host_arrays(plan, pending)
        T = int(arrays["positions"].size)
        S = len(plan.chunks)
        pre_seq = arrays["x_pre_seq"]
        n_pre = pre_seq.size
        if n_pre > g.layout["pre_seq"][1][0] or arrays["block_tables"].shape[1] > self.width:
            if pending is not None:
                del pending[mark:]                  # the caller builds the step eagerly instead
            return None
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            g.h(name)[:len(arrays[name])] = arrays[name]
        g.h("query_start_loc")[:S + 1] = arrays["query_start_loc"]
        bt = arrays["block_tables"]
        g.h("block_tables")[:S, :bt.shape[1]] = bt
        self._pad_mixed(g, t, T, S)
        last_pad = S + (t - T) - 1
        dec = arrays["x_dec_seq"]
        g.h("dec_seq")[:dec.size] = dec
        g.h("dec_seq")[dec.size:] = np.minimum(np.arange(S, S + t - dec.size), last_pad)
        g.h("dec_off")[:] = 0
        g.h("pre_seq")[:n_pre] = pre_seq
        g.h("pre_off")[:n_pre] = arrays["x_pre_off"]
        g.h("pre_seq")[n_pre:] = last_pad
        g.h("pre_off")[n_pre:] = 0
        return arrays["logits_indices"].tolist(), reqs

    def _mixed_graph(self, t: int) -> _Graph:
        g = self.mixed_graphs.get(t)
        if g is None:
            g = _Graph(self._mixed_shapes(t), self.ex.device)
            def constants() -> None:
                self._pad_mixed(g, t, 0, 0)                 # all padding while capturing
                g.h("dec_seq")[:] = np.arange(t)
                g.h("pre_seq")[:] = t - 1
            g.both(constants)
            meta = self._meta(g, t, t, {"dec_seq": t, "pre_seq": self._prefill_programs(t)})
            self._capture(g, meta)
            self.mixed_graphs[t] = g
        return g

    # --- shared ----------------------------------------------------------------------------
    def _meta(self, g: _Graph, tokens: int, seqs: int, launches: dict[str, int]) -> AttentionMetadata:
        extra = {k: g.d(k) for k in ("dec_seq", "dec_off", "pre_seq", "pre_off") if k in g.layout}
        return AttentionMetadata(
            slot_mapping=g.d("slot_mapping"), query_start_loc=g.d("query_start_loc"),
            seq_lens=g.d("seq_lens"), block_tables=g.d("block_tables"),
            num_tokens=tokens, num_seqs=seqs, max_query_len=tokens, max_seq_len=self.width * self.block_size,
            query_start_loc_host=np.arange(seqs + 1, dtype=np.int32), seq_lens_host=np.ones(seqs, np.int32),
            block_size=self.block_size, extra=extra, extra_host=launches)

    def _capture(self, g: _Graph, meta: AttentionMetadata) -> None:
        g.dev.copy_(g.hosts[g.fill])
        ex = self.ex
        ids, pos = g.d("input_ids"), g.d("positions")
        s = torch.cuda.Stream(ex.device)
        s.wait_stream(torch.cuda.current_stream(ex.device))
        with torch.cuda.stream(s):                 # compile kernels / warm the allocator off-graph
            for _ in range(2):
                ex.model(ids, pos, meta, ex.kv, ex.backend, ex.ops)
        torch.cuda.current_stream(ex.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            g.hidden = ex.model(ids, pos, meta, ex.kv, ex.backend, ex.ops)
        self.pool = graph.pool()
        g.graph = graph
