"""Fused GPU kernels for the model's non-matmul work (same semantics as ``TorchOps``).

Each replaces a chain of eager PyTorch ops that would each stream the activations
through memory: RMSNorm (optionally with the residual add), SiLU-and-multiply, and
q/k-norm + RoPE + the KV-cache scatter in one pass over the fused q/k/v projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fairbatch.engine.ops import TorchOps


@triton.jit
def _rms_norm_kernel(X, R, W, Y, RES_OUT, stride_x, stride_r, stride_y, stride_ro, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        # residual sum rounded to the model dtype, as the eager model does
        x = x + tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0)
    y = (xf * rstd).to(x.dtype) * w
    tl.store(Y + row * stride_y + cols, y, mask=ok)


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(Y + row * stride_y + cols, s * u, mask=ok)


@triton.jit
def _qk_rope_cache_kernel(QKV, POS, COS_SIN, QNW, KNW, QOUT, KC, VC, SLOTS,
                          stride_t, stride_qo_t, stride_qo_h,
                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                          eps,
                          H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF_P: tl.constexpr,
                          BLOCK_H: tl.constexpr, PAGE: tl.constexpr, QK_NORM: tl.constexpr):
    # One program per token and BLOCK_H of its q/k/v heads: a head's 128 values are too
    # little work for a program of their own (98k programs for a 2k-token step of
    # Llama-3-8B, each re-reading the token's cos/sin row).
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    HALF: tl.constexpr = D // 2
    c = tl.arange(0, HALF_P)
    ok = c < HALF
    is_q = hh < H
    is_k = (hh >= H) & (hh < H + KVH)
    is_v = (hh >= H + KVH) & (hh < H + 2 * KVH)
    m = (is_q | is_k | is_v)[:, None] & ok[None, :]
    pos = tl.load(POS + t).to(tl.int64)
    cos = tl.load(COS_SIN + pos * D + c, mask=ok, other=0.0)[None, :]
    sin = tl.load(COS_SIN + pos * D + HALF + c, mask=ok, other=0.0)[None, :]
    base = QKV + t * stride_t + hh[:, None] * D + c[None, :]
    x1 = tl.load(base, mask=m, other=0.0)
    x2 = tl.load(base + HALF, mask=m, other=0.0)
    dt = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if QK_NORM:
        rstd = (1.0 / tl.sqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / D + eps))[:, None]
        qw1 = tl.load(QNW + c, mask=ok, other=0.0)[None, :]
        qw2 = tl.load(QNW + HALF + c, mask=ok, other=0.0)[None, :]
        kw1 = tl.load(KNW + c, mask=ok, other=0.0)[None, :]
        kw2 = tl.load(KNW + HALF + c, mask=ok, other=0.0)[None, :]
        w1 = tl.where(is_q[:, None], qw1, kw1)
        w2 = tl.where(is_q[:, None], qw2, kw2)
        a = ((a * rstd).to(dt) * w1).to(tl.float32)    # v rows too, but they store x1/x2
        b = ((b * rstd).to(dt) * w2).to(tl.float32)
    r1 = (a * cos - b * sin).to(dt)
    r2 = (b * cos + a * sin).to(dt)
    qdst = QOUT + t * stride_qo_t + hh[:, None] * stride_qo_h + c[None, :]
    mq = is_q[:, None] & ok[None, :]
    tl.store(qdst, r1, mask=mq)
    tl.store(qdst + HALF, r2, mask=mq)
    slot = tl.load(SLOTS + t).to(tl.int64)
    kdst = KC + (slot // PAGE) * stride_kb + (slot % PAGE) * stride_ks + (hh - H)[:, None] * stride_kh + c[None, :]
    mk = is_k[:, None] & ok[None, :]
    tl.store(kdst, r1.to(KC.dtype.element_ty), mask=mk)
    tl.store(kdst + HALF, r2.to(KC.dtype.element_ty), mask=mk)
    vdst = VC + (slot // PAGE) * stride_vb + (slot % PAGE) * stride_vs + (hh - H - KVH)[:, None] * stride_vh + c[None, :]
    mv = is_v[:, None] & ok[None, :]
    tl.store(vdst, x1.to(VC.dtype.element_ty), mask=mv)
    tl.store(vdst + HALF, x2.to(VC.dtype.element_ty), mask=mv)


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


class TritonOps(TorchOps):
    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] == 0:
            return TorchOps.rms_norm(x, weight, eps)
        y = torch.empty_like(x)
        N = x.shape[1]
        _rms_norm_kernel[(x.shape[0],)](x, x, weight, y, y, x.stride(0), 0, y.stride(0), 0, N, eps,
                                        HAS_RES=False, BLOCK=_pow2(N), num_warps=_warps(N))
        return y

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == 0:
            return super().add_rms_norm(x, residual, weight, eps)
        y = torch.empty_like(x)
        res = torch.empty_like(x)
        N = x.shape[1]
        _rms_norm_kernel[(x.shape[0],)](x, residual, weight, y, res, x.stride(0), residual.stride(0),
                                        y.stride(0), res.stride(0), N, eps,
                                        HAS_RES=True, BLOCK=_pow2(N), num_warps=_warps(N))
        return y, res

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        T, N2 = gate_up.shape
        N = N2 // 2
        y = torch.empty(T, N, dtype=gate_up.dtype, device=gate_up.device)
        if T == 0:
            return y
        BLOCK = 1024
        _silu_mul_kernel[(T, triton.cdiv(N, BLOCK))](gate_up, y, gate_up.stride(0), y.stride(0), N,
                                                     BLOCK=BLOCK, num_warps=4)
        return y

    def qk_rope_cache(self, qkv, num_heads, num_kv_heads, head_dim, positions, cos_sin, q_norm, k_norm,
                      eps, k_cache, v_cache, slot_mapping):
        T = qkv.shape[0]
        q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        if T == 0:
            return q
        has_norm = q_norm is not None
        heads = num_heads + 2 * num_kv_heads
        block_h = min(16, _pow2(heads))
        _qk_rope_cache_kernel[(T, triton.cdiv(heads, block_h))](
            qkv, positions, cos_sin, q_norm if has_norm else qkv, k_norm if has_norm else qkv, q,
            k_cache, v_cache, slot_mapping,
            qkv.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            eps, H=num_heads, KVH=num_kv_heads, D=head_dim, HALF_P=_pow2(head_dim // 2), BLOCK_H=block_h,
            PAGE=k_cache.shape[1], QK_NORM=has_norm, num_warps=4)
        return q


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8
