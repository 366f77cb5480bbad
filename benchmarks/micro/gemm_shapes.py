"""The linear layers' GEMMs at the row counts chunked prefill forms (issue #15): TFLOP/s of
one layer's four GEMMs (fused QKV, output, fused gate/up, down; Llama-3-8B shapes, bf16)
for M = 64-2,048 token rows, as the engine calls them (``F.linear``), and with M padded
up to a multiple of 128 (does cuBLAS pick worse tiles for ragged M?).

    PYTHONPATH=src python benchmarks/micro/gemm_shapes.py --out gemm_shapes.json
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from engine_roofline import sweep_main

# (name, in features, out features) of one Llama-3-8B layer
LLAMA_3_8B = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096))
ROWS = (64, 128, 192, 256, 300, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048)


def layer_ms(m: int, weights: list[torch.Tensor]) -> float:
    import triton.testing

    xs = [torch.randn(m, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]

    def run():
        for x, w in zip(xs, weights):
            F.linear(x, w)

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def sweep(shapes=LLAMA_3_8B, rows=ROWS) -> list[dict]:
    weights = [torch.randn(n_out, n_in, dtype=torch.bfloat16, device="cuda") / n_in ** 0.5 for _, n_in, n_out in shapes]
    flops_per_row = sum(2 * n_in * n_out for _, n_in, n_out in shapes)
    wbytes = sum(2 * n_in * n_out for _, n_in, n_out in shapes)
    out = []
    for m in rows:
        padded = -(-m // 128) * 128
        ms = layer_ms(m, weights)
        ms_pad = layer_ms(padded, weights) if padded != m else ms
        row = {"rows": m, "ms": ms, "TFLOPs": flops_per_row * m / ms / 1e9, "weight_TBps": wbytes / ms / 1e9,
               "padded_rows": padded, "padded_ms": ms_pad}
        out.append(row)
        print(f"M={m:5d} {ms * 1e3:7.1f} us {row['TFLOPs']:5.0f} TFLOP/s {row['weight_TBps']:.2f} TB/s of weights"
              f"  | padded to {padded}: {ms_pad * 1e3:7.1f} us", flush=True)
    return out


def main() -> None:
    sweep_main("gemm_shapes.json", sweep)


if __name__ == "__main__":
    main()
