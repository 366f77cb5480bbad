"""Paged attention for mixed batches in Triton (prefill chunks and decodes, one step).

One kernel, two launch shapes. Each program owns ``BLOCK_Q`` consecutive query tokens of
one sequence and *all* ``GROUP`` query heads that share one KV head (GQA), so every K/V
tile read from the cache serves ``BLOCK_Q * GROUP`` query rows. Decodes (one new token)
launch with ``BLOCK_Q = 1`` (a program per sequence x KV head: the KV read is the cost);
prefill chunks launch with ``BLOCK_Q = 128 // GROUP`` rows (tensor-core tiles). When few
sequences decode, their keys are split over several programs (split-KV, as flash-decoding
does; ``attention/split_kv.py``), each writing a partial result and its log-sum-exp that a small
second kernel merges.

The context of a sequence is ``seq_lens[s]`` tokens, all in the cache (the step's new
K/V were written first); a query at absolute position ``p`` attends positions ``0..p``.
Key tiles entirely at or before a program's first query position need no mask; only the
diagonal tiles are masked, so a long cached context costs plain streaming.
Online softmax in float32 with exp2 (the scale folded with log2(e)).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fairbatch.engine.attention import PREFILL_KERNELS, AttentionMetadata, split_kv
from fairbatch.engine.attention.sdpa_prefill import prefill_attention

LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    Q, K, V, O, O_PART, LSE_PART,
    block_tables, seq_lens, query_start_loc, prog_seq, prog_qoff,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_P: tl.constexpr, PAGE: tl.constexpr,
    PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(prog_seq + pid)
    qoff = tl.load(prog_qoff + pid)
    q_begin = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_begin
    ctx = tl.load(seq_lens + seq)
    first_pos = ctx - q_len                       # absolute position of the seq's first new token

    offs_m = tl.arange(0, BLOCK_M)
    t = offs_m // GROUP_P
    g = offs_m % GROUP_P
    tok = qoff + t
    row_ok = (t < BLOCK_Q) & (tok < q_len) & (g < GROUP)
    q_pos = first_pos + tok
    head = kvh * GROUP + g
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)

    blk_first = first_pos + qoff                             # earliest query position here
    kv_end = tl.minimum(first_pos + qoff + BLOCK_Q, ctx)     # keys any row here may see
    full_end = ((blk_first + 1) // BLOCK_N) * BLOCK_N        # tiles every row sees in full
    # split-KV: this program's share of the keys, whole tiles (NUM_SPLITS = 1: all of them)
    per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_end)
    bt_row = block_tables + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh

    for start in range(lo, tl.minimum(full_end, hi), BLOCK_N):
        n = start + offs_n
        page = tl.load(bt_row + n // PAGE).to(tl.int64)
        slot = n % PAGE
        k = tl.load(k_base + page[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    for start in range(tl.maximum(full_end, lo), hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = n % PAGE
        k = tl.load(k_base + page[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        l_i = tl.where(row_ok, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(O + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # a partial result per split (decodes only: one row per head), merged by
        # _merge_splits_kernel; an empty split (past the context) leaves lse = -inf
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        part = (pid * NUM_SPLITS + split) * (GROUP * tl.num_programs(1)) + head   # [prog, split, head]
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(O_PART, LSE_PART, O, prog_seq, query_start_loc, stride_ot, stride_oh,
                         NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_P: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_loc + tl.load(prog_seq + pid)).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, D_P)
    s_ok = offs_s < NUM_SPLITS
    part = (pid * NUM_SPLITS + offs_s) * NUM_HEADS + head
    lse = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(O + row * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


# Launch configurations, tuned on an H100 with benchmarks/micro/engine_roofline.py (Llama-3-8B
# heads, bf16): decode at 128 x 2048 context streams KV at 2.89 TB/s (the copy ceiling is
# 2.97 read+write); a 4096-token causal prefill runs at 317 TFLOP/s. Overridable.
DECODE_CONFIG = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3}
PREFILL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# Split-KV for small decode batches (attention/split_kv.py); overridable like the configs
# above (programs_per_sm 0 turns it off; max_splits a power of two).
SPLIT_KV = {"programs_per_sm": split_kv.PROGRAMS_PER_SM, "max_splits": split_kv.MAX_SPLITS}


def _next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


class TritonPagedAttention:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, overlap: bool = False,
                 prefill: str = "triton") -> None:
        """``overlap``: in eager mixed steps, decode attention on a second stream beside the
        prefill chunks' attention. ``prefill``: eager steps' prefill chunks through this
        file's kernel ("triton") or torch's scaled-dot-product attention over each chunk's
        gathered context ("sdpa", attention/sdpa_prefill.py). Both off until measured on a
        GPU (`fairbatch serve --attention-overlap --prefill-attention sdpa`)."""
        if prefill not in PREFILL_KERNELS:
            raise ValueError(f"unknown prefill attention {prefill!r}; choose from {', '.join(PREFILL_KERNELS)}")
        self.overlap = overlap
        self.prefill = prefill
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.group_p = _next_pow2(self.group)
        self.head_dim = head_dim
        self.d_p = max(16, _next_pow2(head_dim))
        self.qk_scale = head_dim ** -0.5 * LOG2E
        self.prefill_block_q = max(1, PREFILL_CONFIG["BLOCK_M"] // self.group_p)
        self._side: torch.cuda.Stream | None = None     # overlap's second stream, made on first use
        self.num_sms = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                        if torch.cuda.is_available() else 8)

    # The launch maps: one entry per program, (sequence, first query token offset).
    def launch_arrays(self, q_lens: np.ndarray, seq_lens: np.ndarray) -> dict[str, np.ndarray]:
        q_lens = np.asarray(q_lens, dtype=np.int32)
        dec = np.nonzero(q_lens == 1)[0].astype(np.int32)
        pre = np.nonzero(q_lens > 1)[0]
        bq = self.prefill_block_q
        nblk = -(-q_lens[pre] // bq)
        pre_seq = np.repeat(pre, nblk).astype(np.int32)
        starts = np.concatenate([np.arange(n, dtype=np.int32) * bq for n in nblk]) if len(pre) else np.zeros(0, np.int32)
        return {"dec_seq": dec, "dec_off": np.zeros(len(dec), np.int32), "pre_seq": pre_seq, "pre_off": starts}

    def decode_splits(self, n_dec: int) -> int:
        """Key splits per decode for a step with ``n_dec`` decodes (``split_kv.decode_splits``)."""
        return split_kv.decode_splits(n_dec, self.num_kv_heads, self.num_sms, **SPLIT_KV)

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_block: int) -> None:
        """Compile the split-KV variants now (one decode of one token in the scratch block
        per split count): eager steps pick any of them, and a Triton compile in the middle
        of serving stalls every request for a second."""
        dev = k_cache.device
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(1, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            seq_lens=torch.ones(1, dtype=torch.int32, device=dev),
            # 16 wide: served block tables are padded to a multiple of 16 (one specialization)
            block_tables=torch.full((1, 16), scratch_block, dtype=torch.int32, device=dev),
            num_tokens=1, num_seqs=1, max_query_len=1, max_seq_len=1,
            query_start_loc_host=np.array([0, 1], np.int32), seq_lens_host=np.ones(1, np.int32),
            block_size=k_cache.shape[1],
            extra={"dec_seq": torch.zeros(1, dtype=torch.int32, device=dev),
                   "dec_off": torch.zeros(1, dtype=torch.int32, device=dev)}, extra_host={"dec_seq": 1})
        q = torch.zeros(1, self.num_heads, self.head_dim, dtype=k_cache.dtype, device=dev)
        out = torch.empty_like(q)
        for splits in split_kv.split_variants(SPLIT_KV["max_splits"]):
            self._launch(q, k_cache, v_cache, out, meta, meta.extra["dec_seq"], meta.extra["dec_off"], 1, 1,
                         max(16, self.group_p), DECODE_CONFIG, splits)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        x = meta.extra
        n_dec = meta.extra_host.get("dec_seq", 0)
        n_pre = meta.extra_host.get("pre_seq", 0)

        def decodes() -> None:
            self._launch(q, k_cache, v_cache, out, meta, x["dec_seq"], x["dec_off"], n_dec, 1,
                         max(16, self.group_p), DECODE_CONFIG, self.decode_splits(n_dec))

        eager = not (q.is_cuda and torch.cuda.is_current_stream_capturing())

        def prefills() -> None:
            if self.prefill == "sdpa" and eager:
                prefill_attention(q, k_cache, v_cache, out, meta, self.head_dim ** -0.5)
                return
            bq = self.prefill_block_q
            self._launch(q, k_cache, v_cache, out, meta, x["pre_seq"], x["pre_off"], n_pre, bq,
                         max(16, bq * self.group_p), PREFILL_CONFIG)

        if n_dec and n_pre and self.overlap and q.is_cuda and eager:
            self._overlapped(decodes, prefills)
            return out
        if n_dec:
            decodes()
        if n_pre:
            prefills()
        return out

    def _overlapped(self, decodes, prefills) -> None:
        """Decode attention (bound by streaming the KV) on a side stream while the prefill
        chunks' attention (bound by tensor-core math) runs on the step's stream: the two
        disjoint halves of one output, joined before the layer goes on."""
        main = torch.cuda.current_stream()
        if self._side is None or self._side.device != main.device:
            self._side = torch.cuda.Stream(main.device)
        self._side.wait_stream(main)          # q and the step's K/V are written
        with torch.cuda.stream(self._side):
            decodes()
        prefills()
        main.wait_stream(self._side)

    def _launch(self, q, k_cache, v_cache, out, meta, prog_seq, prog_off, n_progs, block_q, block_m, cfg, splits=1):
        if splits > 1:
            o_part = torch.empty(n_progs * splits * self.num_heads, self.head_dim, dtype=torch.float32, device=q.device)
            lse_part = torch.empty(n_progs * splits * self.num_heads, dtype=torch.float32, device=q.device)
        else:
            o_part = lse_part = out          # unused
        _paged_attention_kernel[(n_progs, self.num_kv_heads, splits)](
            q, k_cache, v_cache, out, o_part, lse_part,
            meta.block_tables, meta.seq_lens, meta.query_start_loc, prog_seq, prog_off,
            self.qk_scale,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            meta.block_tables.stride(0),
            GROUP=self.group, GROUP_P=self.group_p, BLOCK_Q=block_q, BLOCK_M=block_m,
            BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=self.head_dim, D_P=self.d_p, PAGE=meta.block_size,
            # float32 models get exact products (the reference tests); 16-bit ones tensor cores
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            NUM_SPLITS=splits,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if splits > 1:
            _merge_splits_kernel[(n_progs, self.num_heads)](
                o_part, lse_part, out, prog_seq, meta.query_start_loc, out.stride(0), out.stride(1),
                NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim, D_P=self.d_p,
                NUM_SPLITS=splits, SPLITS_P=_next_pow2(splits), num_warps=1,
            )
