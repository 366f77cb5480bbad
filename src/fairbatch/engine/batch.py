"""StepPlan -> the flattened tensors of one forward pass.

Chunk ``(req, k)`` contributes the tokens at positions ``num_computed .. num_computed+k-1``
of ``prompt + output`` (so a recompute after preemption replays generated tokens as if
they were prompt). Each token's cache slot comes from the request's block table in the
shared ``BlockAllocator``. Everything is assembled with numpy on the host and moved to the
device as one packed int32 buffer: one transfer per step, whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fairbatch.engine.attention import AttentionBackend, AttentionMetadata
from fairbatch.kv import BlockAllocator
from fairbatch.plan import StepPlan
from fairbatch.request import Request


@dataclass
class StepInputs:
    input_ids: torch.Tensor           # [T] int32
    positions: torch.Tensor           # [T] int32
    logits_indices: torch.Tensor      # [n] rows of the hidden states to sample from
    meta: AttentionMetadata
    sample_requests: list[Request]    # in the order of logits_indices


class BlockTableCache:
    """Per-request numpy copies of the allocator's block tables. A running request's
    table only grows, so a decode step re-converts it once every ``block_size`` tokens
    instead of every step; a new list object (after a free) forces a rebuild."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, tuple[int, int, np.ndarray]] = {}

    def get(self, rid: str, table: list[int]) -> np.ndarray:
        hit = self._rows.get(rid)
        if hit is not None and hit[0] == id(table) and hit[1] == len(table):
            return hit[2]
        arr = np.asarray(table, dtype=np.int32)
        self._rows[rid] = (id(table), len(table), arr)
        return arr

    def drop(self, rid: str) -> None:
        self._rows.pop(rid, None)


def _token_slice(req: Request, start: int, stop: int) -> list[int]:
    p = req.prompt_token_ids
    plen = req.prompt_len
    if stop <= plen:
        return p[start:stop]
    out = req.output_token_ids
    if start >= plen:
        return out[start - plen:stop - plen]
    return p[start:] + out[:stop - plen]


def _pend(pending: list[tuple[int, Request, int]] | None, index: int, req: Request, known: int, stop: int) -> None:
    """Note the in-flight token at input index ``index`` (see ``host_arrays``)."""
    if pending is None or stop != known + 1:
        raise RuntimeError(f"request {req.request_id}: tokens up to position {stop} needed, ids known up to "
                           f"{known}" + ("" if pending is None else " (only the last may be in flight)"))
    pending.append((index, req, known - req.prompt_len))


# Every array starts on a 64-byte boundary of the packed buffer. Triton specializes a
# kernel on whether each pointer argument is 16-byte aligned: views at arbitrary offsets
# would make every step shape a new combination to JIT-compile (~1 s each, mid-serving).
ALIGN_ELEMS = 16


def aligned(n: int) -> int:
    """``n`` rounded up to whole ``ALIGN_ELEMS``."""
    return -(-n // ALIGN_ELEMS) * ALIGN_ELEMS


def pack_to_device(arrays: dict[str, np.ndarray], device: torch.device,
                   pinned: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Concatenate int32 arrays (each aligned), copy once, return device views by name."""
    offsets = []
    total = 0
    for a in arrays.values():
        offsets.append(total)
        total += aligned(a.size)
    flat = np.zeros(total, np.int32)
    for off, a in zip(offsets, arrays.values()):
        flat[off:off + a.size] = a.reshape(-1)
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        if pinned is not None and pinned.numel() >= host.numel():
            staging = pinned[:host.numel()]
            staging.copy_(host)
            dev = staging.to(device, non_blocking=True)
        else:
            dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)
    return {name: dev[off:off + a.size].view(a.shape) for (name, a), off in zip(arrays.items(), offsets)}


class BatchBuilder:
    def __init__(self, allocator: BlockAllocator, backend: AttentionBackend, device: torch.device,
                 pinned_elems: int = 1 << 20) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.backend = backend
        self.device = device
        self.tables = BlockTableCache()
        # Reused staging buffer: a pinned copy per step would cost a cudaHostAlloc each time.
        self.pinned = torch.empty(pinned_elems, dtype=torch.int32).pin_memory() if device.type == "cuda" else None

    def host_arrays(self, plan: StepPlan, pending: list[tuple[int, Request, int]] | None = None
                    ) -> tuple[dict[str, np.ndarray], list[Request], int, int]:
        """Host int32 arrays of the step, the requests that sample, max query/seq len.

        ``pending``: a step planned while the last one runs (``step_ahead.py``) may need
        a token whose id is still being sampled (its request's last, counted in
        ``generated`` but not yet in ``output_token_ids``). Its input id is left 0 and
        ``(index in input_ids, request, output index)`` appended here, for the caller to
        fill in once the id is known. Without the list such a token is an error."""
        B = self.block_size
        chunks = plan.chunks
        S = len(chunks)
        q_lens = np.empty(S, np.int32)
        ctx0 = np.empty(S, np.int32)
        ids: list[int] = []
        rows: list[np.ndarray] = []
        sample_seq: list[int] = []
        sample_reqs: list[Request] = []
        alloc = self.allocator
        for i, (req, k) in enumerate(chunks):
            c = req.num_computed
            q_lens[i] = k
            ctx0[i] = c
            known = req.prompt_len + len(req.output_token_ids)
            if c + k > known:
                ids.extend(_token_slice(req, c, known))
                _pend(pending, len(ids), req, known, c + k)
                ids.append(0)
            elif k == 1:
                ids.append(req.prompt_token_ids[c] if c < req.prompt_len else req.output_token_ids[c - req.prompt_len])
            else:
                ids.extend(_token_slice(req, c, c + k))
            table = alloc.block_table(req.request_id)
            need = -(-(c + k) // B)
            if len(table) < need:
                raise RuntimeError(f"request {req.request_id}: {len(table)} KV blocks allocated, "
                                   f"{need} needed for {c + k} tokens (scheduler bug)")
            rows.append(self.tables.get(req.request_id, table))
            if c + k == req.prompt_len + req.generated:
                sample_seq.append(i)
                sample_reqs.append(req)
        seq_lens = ctx0 + q_lens
        qsl = np.zeros(S + 1, np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        T = int(qsl[-1])
        # a width that is a multiple of 16 keeps the block-table stride one Triton specialization
        width = aligned(int(-(-seq_lens.max() // B)) if S else 1)
        bt = np.zeros((S, width), np.int32)
        for i, r in enumerate(rows):
            n = min(len(r), width)
            bt[i, :n] = r[:n]
        seq_of_tok = np.repeat(np.arange(S, dtype=np.int32), q_lens)
        positions = (np.arange(T, dtype=np.int32) - qsl[:-1][seq_of_tok] + ctx0[seq_of_tok]).astype(np.int32)
        slots = bt[seq_of_tok, positions // B] * B + positions % B
        logits_idx = qsl[1:][np.asarray(sample_seq, dtype=np.int64)] - 1 if sample_seq else np.zeros(0, np.int32)
        arrays = {
            "input_ids": np.asarray(ids, dtype=np.int32),
            "positions": positions,
            "slot_mapping": slots.astype(np.int32),
            "query_start_loc": qsl,
            "seq_lens": seq_lens,
            "block_tables": bt,
            "logits_indices": logits_idx.astype(np.int32),
        }
        for name, a in self.backend.launch_arrays(q_lens, seq_lens).items():
            arrays["x_" + name] = a
        return arrays, sample_reqs, int(q_lens.max()) if S else 0, int(seq_lens.max()) if S else 0

    def build(self, plan: StepPlan) -> StepInputs:
        arrays, sample_reqs, max_q, max_s = self.host_arrays(plan)
        return self.to_device(arrays, sample_reqs, max_q, max_s)

    def to_device(self, arrays: dict[str, np.ndarray], sample_reqs: list[Request], max_q: int, max_s: int
                  ) -> StepInputs:
        """``host_arrays``' output as the forward pass's inputs (one copy to the device)."""
        dev = pack_to_device(arrays, self.device, self.pinned)
        extra = {k[2:]: v for k, v in dev.items() if k.startswith("x_")}
        meta = AttentionMetadata(
            slot_mapping=dev["slot_mapping"], query_start_loc=dev["query_start_loc"],
            seq_lens=dev["seq_lens"], block_tables=dev["block_tables"],
            num_tokens=int(arrays["positions"].size), num_seqs=int(arrays["seq_lens"].size),
            max_query_len=max_q, max_seq_len=max_s,
            query_start_loc_host=arrays["query_start_loc"], seq_lens_host=arrays["seq_lens"],
            block_size=self.block_size, extra=extra,
            extra_host={k[2:]: int(v.size) for k, v in arrays.items() if k.startswith("x_")})
        return StepInputs(dev["input_ids"], dev["positions"], dev["logits_indices"], meta, sample_reqs)

    def release(self, req: Request) -> None:
        self.tables.drop(req.request_id)
