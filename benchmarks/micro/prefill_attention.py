"""Prefill attention (issue #15): this engine's paged Triton kernel against torch's
scaled-dot-product attention backends on the same causal problem, to size what a better
prefill kernel could buy before writing one.

Llama-3-8B heads (32 query, 8 KV, head dim 128), bf16, one layer, prompts of 512-8,192
tokens starting at position 0: ours over a paged cache with scattered blocks and with the
blocks in order, the engine's SDPA prefill path (``--prefill-attention sdpa``: each
chunk's context gathered from the cache, then torch's attention), and `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`
on contiguous tensors with each backend torch offers here (flash, cuDNN, efficient).
TFLOP/s counts the causal half (4 * pairs * heads * head dim).

    PYTHONPATH=src python benchmarks/micro/prefill_attention.py --out prefill_attention.json
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from engine_roofline import paged_inputs, paged_meta, sweep_main

H, KVH, D, B = 32, 8, 128, 16


def sweep(lengths=(512, 1024, 2048, 4096, 8192)) -> list[dict]:
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fairbatch.engine.attention.triton_paged import TritonPagedAttention

    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    rows = []
    for n in lengths:
        flops = 4 * (n * (n + 1) / 2) * H * D
        q, kc, vc, seq_lens = paged_inputs([n], [0], H, KVH, D, B)
        att = TritonPagedAttention(H, KVH, D)
        row = {"tokens": n, "ms": {}}
        scattered = paged_meta(att, [n], seq_lens, B)
        row["ms"]["ours, scattered blocks"] = bench(lambda: att.forward(q, kc, vc, scattered))
        in_order = paged_meta(att, [n], seq_lens, B)
        in_order.block_tables.copy_(torch.arange(in_order.block_tables.shape[1], dtype=torch.int32, device="cuda"))
        row["ms"]["ours, blocks in order"] = bench(lambda: att.forward(q, kc, vc, in_order))
        sdpa = TritonPagedAttention(H, KVH, D, prefill="sdpa")     # the engine's other prefill path
        row["ms"]["sdpa path, scattered blocks"] = bench(lambda: sdpa.forward(q, kc, vc, scattered))
        # the same keys and values, contiguous, [1, heads, tokens, head dim]
        k = kc.reshape(-1, KVH, D)[:n].transpose(0, 1).unsqueeze(0).contiguous()
        v = vc.reshape(-1, KVH, D)[:n].transpose(0, 1).unsqueeze(0).contiguous()
        qq = q.transpose(0, 1).unsqueeze(0).contiguous()
        for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: F.scaled_dot_product_attention(qq, k, v, is_causal=True, enable_gqa=True)
                    fn()
                    row["ms"][name] = bench(fn)
            except Exception as e:      # a backend this build or shape does not support
                row["ms"][name] = None
                row.setdefault("errors", {})[name] = str(e)[:160]
        row["TFLOPs"] = {k: (flops / ms / 1e9 if ms else None) for k, ms in row["ms"].items()}
        rows.append(row)
        print(f"{n:5d} tokens: " + "  ".join(f"{k} {v:.0f}" for k, v in row["TFLOPs"].items() if v) + " TFLOP/s",
              flush=True)
    return rows


def main() -> None:
    sweep_main("prefill_attention.json", sweep)


if __name__ == "__main__":
    main()
