"""CUDA graphs for decode-only steps.

A decode step of a few requests is dozens of small kernels per layer; launching them from
Python costs more than they run. Decode steps therefore replay a graph captured per
batch-size bucket, over static input buffers: the host packs the step's indices into one
pinned buffer and the replay starts with a single copy. Padding rows write their K/V
to the cache's scratch block and attend only to it, so they never touch live requests.
The graph stops at the final hidden states; logits of the sampling rows are computed
eagerly (keeping vocabulary-sized outputs out of every bucket's static memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fairbatch.engine.attention import AttentionMetadata
from fairbatch.plan import StepPlan
from fairbatch.request import Request

if TYPE_CHECKING:
    from fairbatch.engine.executor import EngineExecutor

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class _Graph:
    def __init__(self, bucket: int, width: int, device: torch.device) -> None:
        self.bucket = bucket
        self.width = width
        # layout of the packed int32 buffer: name -> (offset, shape)
        shapes = {"input_ids": (bucket,), "positions": (bucket,), "slot_mapping": (bucket,),
                  "query_start_loc": (bucket + 1,), "seq_lens": (bucket,), "block_tables": (bucket, width),
                  "dec_seq": (bucket,), "dec_off": (bucket,)}
        self.layout: dict[str, tuple[int, tuple[int, ...]]] = {}
        off = 0
        for name, shape in shapes.items():
            self.layout[name] = (off, shape)
            off += int(np.prod(shape))
        self.host = torch.zeros(off, dtype=torch.int32).pin_memory()
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(off, dtype=torch.int32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None

    def host_view(self, name: str) -> np.ndarray:
        off, shape = self.layout[name]
        return self.host_np[off:off + int(np.prod(shape))].reshape(shape)

    def dev_view(self, name: str) -> torch.Tensor:
        off, shape = self.layout[name]
        return self.dev[off:off + int(np.prod(shape))].view(shape)


class DecodeGraphs:
    def __init__(self, ex: "EngineExecutor", max_batch: int, max_model_len: int) -> None:
        self.ex = ex
        self.block_size = ex.kv.block_size
        self.width = -(-max_model_len // self.block_size)
        self.buckets = [b for b in BUCKETS if b <= max_batch]
        if not self.buckets or self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        self.max_batch = max_batch
        self.graphs: dict[int, _Graph] = {}
        self.pool = None
        self.replays = 0

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(n)

    def capture_all(self) -> None:
        for b in reversed(self.buckets):   # largest first: smaller graphs reuse its pool memory
            self._get(b)

    def try_run(self, plan: StepPlan) -> tuple[torch.Tensor, list[Request]] | None:
        chunks = plan.chunks
        n = len(chunks)
        if n == 0 or n > self.max_batch:
            return None
        for _, k in chunks:
            if k != 1:
                return None
        g = self._get(self.bucket_for(n))
        sample_rows, reqs = self._fill(g, chunks)
        g.dev.copy_(g.host, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        if not reqs:
            return g.hidden[:0, :0], []
        rows = g.hidden[:n] if len(sample_rows) == n else g.hidden[torch.tensor(sample_rows, device=g.hidden.device)]
        return self.ex.model.compute_logits(rows), reqs

    # --- internals -------------------------------------------------------------------------
    def _fill(self, g: _Graph, chunks: list[tuple[Request, int]]) -> tuple[list[int], list[Request]]:
        B = self.block_size
        scratch = self.ex.kv.scratch_block
        ids, pos, slots, lens, bt = (g.host_view(k) for k in ("input_ids", "positions", "slot_mapping", "seq_lens",
                                                             "block_tables"))
        n = len(chunks)
        tables = self.ex.builder.tables
        alloc = self.ex.allocator
        sample_rows: list[int] = []
        reqs: list[Request] = []
        for i, (req, _) in enumerate(chunks):
            c = req.num_computed
            plen = req.prompt_len
            ids[i] = req.prompt_token_ids[c] if c < plen else req.output_token_ids[c - plen]
            pos[i] = c
            row = tables.get(req.request_id, alloc.block_table(req.request_id))
            nb = c // B + 1
            if nb > self.width:
                raise RuntimeError(f"request {req.request_id} exceeds the graph's context limit")
            bt[i, :nb] = row[:nb]
            slots[i] = row[c // B] * B + c % B
            lens[i] = c + 1
            if c + 1 == plen + req.generated:
                sample_rows.append(i)
                reqs.append(req)
        # padding rows: their own token in the scratch block, nothing else
        ids[n:] = 0
        pos[n:] = 0
        slots[n:] = scratch * B
        lens[n:] = 1
        bt[n:, 0] = scratch
        return sample_rows, reqs

    def _meta(self, g: _Graph) -> AttentionMetadata:
        b = g.bucket
        return AttentionMetadata(
            slot_mapping=g.dev_view("slot_mapping"), query_start_loc=g.dev_view("query_start_loc"),
            seq_lens=g.dev_view("seq_lens"), block_tables=g.dev_view("block_tables"),
            num_tokens=b, num_seqs=b, max_query_len=1, max_seq_len=g.width * self.block_size,
            query_start_loc_host=np.arange(b + 1, dtype=np.int32), seq_lens_host=np.ones(b, np.int32),
            block_size=self.block_size,
            extra={"dec_seq": g.dev_view("dec_seq"), "dec_off": g.dev_view("dec_off")},
            extra_host={"dec_seq": b, "pre_seq": 0})

    def _get(self, bucket: int) -> _Graph:
        g = self.graphs.get(bucket)
        if g is not None:
            return g
        g = _Graph(bucket, self.width, self.ex.device)
        g.host_view("query_start_loc")[:] = np.arange(bucket + 1)
        g.host_view("dec_seq")[:] = np.arange(bucket)
        self._fill(g, [])                          # all padding while warming up and capturing
        g.dev.copy_(g.host)
        meta = self._meta(g)
        ex = self.ex
        ids, pos = g.dev_view("input_ids"), g.dev_view("positions")
        s = torch.cuda.Stream(ex.device)
        s.wait_stream(torch.cuda.current_stream(ex.device))
        with torch.cuda.stream(s):                 # compile kernels / warm allocator off-graph
            for _ in range(2):
                ex.model(ids, pos, meta, ex.kv, ex.backend, ex.ops)
        torch.cuda.current_stream(ex.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            g.hidden = ex.model(ids, pos, meta, ex.kv, ex.backend, ex.ops)
        self.pool = graph.pool()
        g.graph = graph
        self.graphs[bucket] = g
        return g
