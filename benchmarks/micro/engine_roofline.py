"""Engine step times vs their roofline on one GPU (Llama-3-8B shape, dummy bf16 weights).

For each step shape: the measured step time (median of timed ``EngineExecutor.execute``
calls, i.e. what the scheduler sees: host batch building, forward, sampling, sync), its
roofline ``max(bytes / BW, FLOPs / F)`` with ``BW`` the measured device-to-device copy
bandwidth (read + write bytes) and ``F`` the measured bf16 8192^3 matmul rate, and the
ratio. Bytes = weights streamed (all but the embedding table) + KV read; FLOPs = linear
layers (2 per weight per token) + lm_head per sampled row + attention (4 * layers * heads *
head_dim per query-key pair).

With --tune, first times Triton attention launch configs on kernel-only microbenchmarks.

    PYTHONPATH=src python benchmarks/micro/engine_roofline.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time

import torch

from fairbatch.plan import attention_pairs


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s) on this GPU."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        st.record(); b.copy_(a); en.record(); en.synchronize()
        times.append(st.elapsed_time(en) / 1e3)
    bw = 2 * n / statistics.median(times)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        st.record(); x @ y; en.record(); en.synchronize()
        times.append(st.elapsed_time(en) / 1e3)
    flops = 2 * m ** 3 / statistics.median(times)
    del x, y
    torch.cuda.empty_cache()
    return bw, flops


def sweep_main(default_out: str, sweep, **notes) -> None:
    """The command line of a kernel sweep script (``gemm_shapes.py``, ``split_kv.py``,
    ``prefill_attention.py``): run ``sweep()`` and write its rows with the date, GPU and
    torch version (and ``notes``) to ``--out``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args()
    rows = sweep()
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, **notes, "rows": rows}, f, indent=1)


def paged_inputs(q_lens, ctx0, H, KVH, D, B=16, dtype=None, spare_blocks=0, generator=None, device="cuda"):
    """Random q and a paged KV cache for sequences with ``q_lens`` new tokens after ``ctx0``
    cached ones (``spare_blocks`` more blocks than they fill): (q, k_cache, v_cache, seq_lens).
    The attention tests build their steps with it too (on the CPU: ``device="cpu"``)."""
    import numpy as np

    dtype = dtype or torch.bfloat16
    seq_lens = np.array([c + k for c, k in zip(ctx0, q_lens)], np.int32)
    nb = sum(-(-int(s) // B) for s in seq_lens) + spare_blocks
    kc = torch.randn(nb, B, KVH, D, dtype=dtype, device=device, generator=generator)
    vc = torch.randn(nb, B, KVH, D, dtype=dtype, device=device, generator=generator)
    q = torch.randn(int(sum(q_lens)), H, D, dtype=dtype, device=device, generator=generator)
    return q, kc, vc, seq_lens


def paged_meta(att, q_lens, seq_lens, B=16, num_blocks=None, extra_width=0, seed=0, device="cuda"):
    """The ``AttentionMetadata`` of one step for backend ``att`` (its launch arrays; None:
    none): each sequence's blocks a slice of a random permutation of the cache's
    ``num_blocks`` (scattered, non-contiguous), block tables ``extra_width`` columns wider
    than needed."""
    import numpy as np

    from fairbatch.engine.attention import AttentionMetadata

    S = len(q_lens)
    nb = num_blocks or sum(-(-int(s) // B) for s in seq_lens)
    W = max(-(-int(s) // B) for s in seq_lens) + extra_width
    perm = np.random.default_rng(seed).permutation(nb).astype(np.int32)
    bt = np.zeros((S, W), np.int32)
    o = 0
    for i, s in enumerate(seq_lens):
        n = -(-int(s) // B)
        bt[i, :n] = perm[o:o + n]
        o += n
    qsl = np.zeros(S + 1, np.int32)
    qsl[1:] = np.cumsum(q_lens)
    T = int(qsl[-1])
    ex = att.launch_arrays(np.array(q_lens), seq_lens) if att is not None else {}
    dev = lambda a: torch.from_numpy(a).to(device)
    return AttentionMetadata(torch.zeros(T, dtype=torch.int32, device=device), dev(qsl), dev(seq_lens), dev(bt), T, S,
                             max(q_lens), int(seq_lens.max()), qsl, seq_lens, B, {k: dev(v) for k, v in ex.items()},
                             {k: int(v.size) for k, v in ex.items()})


def tune_attention(report: list) -> None:
    """Kernel-only timings of launch configs; the fastest becomes the module default."""
    from fairbatch.engine.attention import triton_paged as tp

    H, KVH, D, B = 32, 8, 128, 16

    def bench(q_lens, ctx0, configs, which):
        q, kc, vc, seq_lens = paged_inputs(q_lens, ctx0, H, KVH, D, B)
        best = None
        kv_bytes = float(seq_lens.sum()) * KVH * D * 2 * 2
        pairs = sum(q * c + q * (q + 1) / 2 for q, c in zip(q_lens, ctx0))
        flops = 4 * pairs * H * D
        for cfg in configs:
            saved = dict(tp.DECODE_CONFIG), dict(tp.PREFILL_CONFIG)
            (tp.DECODE_CONFIG if which == "decode" else tp.PREFILL_CONFIG).update(cfg)
            try:
                att = tp.TritonPagedAttention(H, KVH, D)
                meta = paged_meta(att, q_lens, seq_lens, B)
                import triton.testing
                ms = triton.testing.do_bench(lambda: att.forward(q, kc, vc, meta), warmup=25, rep=100,
                                             return_mode="median")
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                report.append({"which": which, "config": cfg, "error": str(e)[:200]})
                tp.DECODE_CONFIG.clear(); tp.DECODE_CONFIG.update(saved[0])
                tp.PREFILL_CONFIG.clear(); tp.PREFILL_CONFIG.update(saved[1])
                continue
            tp.DECODE_CONFIG.clear(); tp.DECODE_CONFIG.update(saved[0])
            tp.PREFILL_CONFIG.clear(); tp.PREFILL_CONFIG.update(saved[1])
            row = {"which": which, "config": cfg, "ms": ms, "TB/s": kv_bytes / ms / 1e9, "TFLOP/s": flops / ms / 1e9}
            report.append(row)
            print(f"  attn {which:7s} {cfg} {ms:.3f} ms  {row['TB/s']:.2f} TB/s  {row['TFLOP/s']:.0f} TFLOP/s", flush=True)
            if best is None or ms < best[0]:
                best = (ms, cfg)
        return best

    dec_cfgs = [{"BLOCK_N": n, "num_warps": w, "num_stages": s}
                for n in (32, 64, 128) for w in (2, 4, 8) for s in (2, 3, 4) if not (n == 128 and w == 2)]
    best = bench([1] * 128, [2047] * 128, dec_cfgs, "decode")
    if best:
        tp.DECODE_CONFIG.update(best[1])
    pre_cfgs = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
                if not (m == 128 and n == 128 and s == 3)]
    best = bench([4096], [0], pre_cfgs, "prefill")
    if best:
        tp.PREFILL_CONFIG.update(best[1])
    print("chosen:", tp.DECODE_CONFIG, tp.PREFILL_CONFIG, flush=True)


def cases(cap_tokens: int):
    out = []
    for b in (1, 32, 128, 256):
        for c in (512, 2048):
            out.append((f"decode b={b} ctx={c}", [(c - 1, 1)] * b))
    out.append(("prefill 16 + 32 dec@1024", [(1023, 1)] * 32 + [(0, 16)]))
    for k in (128, 512, 2048, 4096):
        out.append((f"prefill {k}", [(0, k)]))
    out.append(("prefill 4096 x2", [(0, 4096), (0, 4096)]))
    out.append(("mixed 128 dec@2048 + 512 chunk", [(2047, 1)] * 128 + [(0, 512)]))
    out.append(("mixed 32 dec@512 + 2048 chunk", [(511, 1)] * 32 + [(0, 2048)]))
    out.append(("mixed 64 dec@1024 + 1024 chunk@2048", [(1023, 1)] * 64 + [(2048, 1024)]))
    fits = []
    for name, comp in out:
        need = sum(-(-(c + k) // 16) * 16 for c, k in comp)
        fits.append((name, comp, need <= cap_tokens))
    return fits


def roofline(spec, comp, bw, flops_rate):
    """-> (bytes, FLOPs, roofline s, phase roofline s). The plain roofline bounds the whole
    step by its larger total; the phase roofline adds the linear layers' and attention's
    bounds, since attention runs between the GEMMs of its layer and cannot overlap them."""
    kv_tok = spec.kv_bytes_per_token
    new = sum(k for _, k in comp)
    ctx = sum(c + k for c, k in comp)
    pairs = sum(attention_pairs(c, k) for c, k in comp)
    lin_flops = new * spec.layer_flops_per_token + len(comp) * spec.lm_head_flops_per_token
    attn_flops = pairs * spec.attn_flops_per_pair
    w_bytes, kv_bytes = spec.streamed_weight_bytes, ctx * kv_tok
    nbytes, flops = w_bytes + kv_bytes, lin_flops + attn_flops
    phase = max(lin_flops / flops_rate, w_bytes / bw) + max(attn_flops / flops_rate, kv_bytes / bw)
    return nbytes, flops, max(nbytes / bw, flops / flops_rate), phase


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="engine_roofline.json")
    ap.add_argument("--tune", action="store_true", help="time attention launch configs first and use the fastest")
    ap.add_argument("--overlap", action="store_true",
                    help="also time mixed steps eagerly with decode attention on a second stream (mode 'overlap')")
    args = ap.parse_args()

    from fairbatch.engine.cuda_graph import MIXED_MAX_TOKENS
    from fairbatch.engine.llm import Engine, EngineArgs
    from fairbatch.engine.profile import measure
    from fairbatch.specs import get_model

    bw, fl = measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {fl / 1e12:.0f} TFLOP/s",
          flush=True)
    tuning: list = []
    if args.tune:
        tune_attention(tuning)
    t = time.time()
    engine = Engine(EngineArgs(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=256))
    engine.kv.data.normal_()
    print(f"engine ready in {time.time() - t:.1f}s: {engine.allocator.num_blocks} KV blocks", flush=True)
    spec = get_model(args.model)
    cap = engine.allocator.num_blocks * engine.allocator.block_size
    rows = []
    for name, comp, fits in cases(cap):
        if not fits:
            rows.append({"case": name, "skipped": f"needs more KV than the {cap}-token cache"})
            print(f"{name:40s} skipped (KV does not fit)", flush=True)
            continue
        tokens = sum(k for _, k in comp)
        graphable = (all(k == 1 for _, k in comp) and len(comp) <= 256) or tokens < MIXED_MAX_TOKENS
        variants = [("graph", True), ("eager", False)] if graphable else [("eager", False)]
        if args.overlap and any(k == 1 for _, k in comp) and any(k > 1 for _, k in comp):
            variants.append(("overlap", False))     # eager, decode attention on a second stream
        for label, use_graph in variants:
            saved = engine.executor.graphs
            if not use_graph:
                engine.executor.graphs = None
            engine.backend.overlap = label == "overlap"
            try:
                sec = measure(engine, comp, repeats=args.repeats)
            finally:
                engine.executor.graphs = saved
                engine.backend.overlap = False
            nbytes, flops, roof, phase = roofline(spec, comp, bw, fl)
            row = {"case": name, "mode": label,
                   "ms": sec * 1e3, "roofline_ms": roof * 1e3, "ratio": sec / roof,
                   "phase_roofline_ms": phase * 1e3, "phase_ratio": sec / phase,
                   "GB": nbytes / 1e9, "TFLOP": flops / 1e12,
                   "achieved_TBps": nbytes / sec / 1e12, "achieved_TFLOPs": flops / sec / 1e12,
                   "frac_of_matmul_rate": flops / sec / fl}
            rows.append(row)
            print(f"{name:40s} {row['mode']:5s} {row['ms']:8.2f} ms  roof {row['roofline_ms']:8.2f} ms  "
                  f"x{row['ratio']:.2f} (phase x{row['phase_ratio']:.2f})  {row['achieved_TBps']:.2f} TB/s  "
                  f"{row['achieved_TFLOPs']:.0f} TFLOP/s", flush=True)
    from fairbatch.engine.attention import triton_paged as tp

    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "model": args.model, "copy_bw_Bps": bw, "matmul_flops": fl,
              "kv_blocks": engine.allocator.num_blocks, "decode_config": tp.DECODE_CONFIG,
              "prefill_config": tp.PREFILL_CONFIG, "rows": rows, "attention_tuning": tuning}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    del engine
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
