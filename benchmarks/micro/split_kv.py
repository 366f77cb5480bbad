"""Split-KV decode attention (issue #15): kernel-only time of the decodes of one step with
keys split over several programs, against one program per sequence x KV head.

For decode batches of 1-128 sequences at contexts of 512-8,192 tokens (Llama-3-8B heads,
bf16, one layer), times ``TritonPagedAttention.forward`` (``triton.testing.do_bench``,
median) with ``SPLIT_KV["programs_per_sm"]`` at each setting (0 = no split), and the KV
streamed per second. The default is the setting that is never much slower and fastest
where it matters (few sequences, long contexts).

    PYTHONPATH=src python benchmarks/micro/split_kv.py --out split_kv.json
"""

from __future__ import annotations


from engine_roofline import paged_inputs, paged_meta, sweep_main

SETTINGS = (0, 2, 4, 8, 16)


def sweep(batches=(1, 4, 16, 32, 64, 128), contexts=(512, 2048, 8192)) -> list[dict]:
    import triton.testing

    from fairbatch.engine.attention import triton_paged as tp

    H, KVH, D, B = 32, 8, 128, 16
    saved = dict(tp.SPLIT_KV)
    rows = []
    try:
        for ctx in contexts:
            for b in batches:
                q_lens, ctx0 = [1] * b, [ctx - 1] * b
                q, kc, vc, seq_lens = paged_inputs(q_lens, ctx0, H, KVH, D, B)
                kv_bytes = float(seq_lens.sum()) * KVH * D * 2 * 2
                row = {"batch": b, "context": ctx, "ms": {}, "splits": {}}
                for setting in SETTINGS:
                    tp.SPLIT_KV["programs_per_sm"] = setting
                    att = tp.TritonPagedAttention(H, KVH, D)
                    meta = paged_meta(att, q_lens, seq_lens, B)
                    row["ms"][setting] = triton.testing.do_bench(lambda: att.forward(q, kc, vc, meta), warmup=25,
                                                                 rep=100, return_mode="median")
                    row["splits"][setting] = att.decode_splits(b) if setting else 1
                row["TBps_off"] = kv_bytes / row["ms"][0] / 1e9
                row["TBps_best"] = kv_bytes / min(row["ms"].values()) / 1e9
                rows.append(row)
                print(f"b={b:4d} ctx={ctx:5d} " + "  ".join(
                    f"{s}:{row['ms'][s] * 1e3:7.1f}us/{row['splits'][s]}" for s in SETTINGS)
                    + f"  ({row['TBps_off']:.2f} -> {row['TBps_best']:.2f} TB/s)", flush=True)
    finally:
        tp.SPLIT_KV.clear()
        tp.SPLIT_KV.update(saved)
    return rows


def main() -> None:
    sweep_main("split_kv.json", sweep, settings="SPLIT_KV programs_per_sm (0 = off): ms per setting, splits per setting")


if __name__ == "__main__":
    main()
