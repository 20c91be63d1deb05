"""GPU kernel benchmarks: paged decode attention bandwidth, paged prefill attention FLOP rate and
the fused decode GEMVs' weight bandwidth, each against the measured ceiling and beside torch's own
kernels (for the GEMVs: the norm / SiLU kernel, cuBLAS and an add) on the same inputs.

    python benchmarks/gpu_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time, measure_ceilings  # noqa: E402
from benchmarks.gemv_sweep import fused_vs_unfused  # noqa: E402
from tests.gpu.random_models import random_cache, random_tables  # noqa: E402
from tuili.kernels import reference, triton_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # one Llama-3.1-8B layer
GEMV_LAYERS = ("llama3-8b/qkv", "llama3-8b/o", "llama3-8b/gate_up", "llama3-8b/down",
               "llama3-8b/lm_head", "smollm2/qkv", "smollm2/gate_up", "smollm2/down")


def paged(seq_lens: list[int]):
    blocks = sum(-(-n // BLOCK) for n in seq_lens)
    return (*random_cache(blocks, BLOCK, KV_HEADS, HEAD_DIM), random_tables(seq_lens, BLOCK, blocks))


def decode_case(batch: int, context: int, read_bw: float) -> dict:
    k, v, tables = paged([context] * batch)
    lens = torch.full((batch,), context, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    ours = cuda_time(lambda: triton_attention.decode_attention(q, k, v, tables, lens,
                                                               HEAD_DIM ** -0.5, out=out),
                     graph=True)
    ref = cuda_time(lambda: reference.decode_attention(q, k, v, tables, lens, context,
                                                       HEAD_DIM ** -0.5), repeat=5, graph=True)
    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
    return dict(case=f"decode attention, batch {batch}, context {context}", tuili_us=ours * 1e6,
                torch_us=ref * 1e6, tuili_gbs=kv_bytes / ours / 1e9,
                of_ceiling=kv_bytes / ours / read_bw)


def prefill_case(n: int, peak: float) -> dict:
    k, v, tables = paged([n])
    q = torch.randn(n, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    seqs = torch.tensor([[0], [n], [0]], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ours = cuda_time(lambda: triton_attention.prefill_attention(q, k, v, tables, seqs, n,
                                                                HEAD_DIM ** -0.5, out), graph=True)
    # torch's flash kernel on contiguous [1, heads, n, d] tensors, K/V heads expanded
    group = HEADS // KV_HEADS
    keys = reference.gather_kv(k, tables[0], n).repeat_interleave(group, 1).transpose(0, 1)[None]
    values = reference.gather_kv(v, tables[0], n).repeat_interleave(group, 1).transpose(0, 1)[None]
    qt = q.transpose(0, 1)[None].contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    sdpa = cuda_time(lambda: F.scaled_dot_product_attention(qt, keys, values, is_causal=True))
    flops = 4 * HEADS * HEAD_DIM * n * (n + 1) / 2
    return dict(case=f"prefill attention, one {n}-token prompt", tuili_us=ours * 1e6,
                torch_us=sdpa * 1e6, tuili_tflops=flops / ours / 1e12, of_ceiling=flops / ours / peak)


def gemv_case(layer: str, m: int, read_bw: float) -> dict:
    r = fused_vs_unfused(layer, m)
    fused, unfused = r["fused_us"] or r["unfused_us"], r["unfused_us"]  # None: cuBLAS serves it
    return dict(case=f"GEMV {layer} +{r['fusion']}, {m} row{'s' if m > 1 else ''}",
                tuili_us=fused, torch_us=unfused, tuili_gbs=r["weight_bytes"] / fused / 1e3,
                of_ceiling=r["weight_bytes"] / (fused / 1e6) / read_bw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    ceilings = measure_ceilings()
    bw, peak = ceilings["read_bytes_per_s"], ceilings["matmul_flops_per_s"]
    print(f"ceilings: read {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    rows = [decode_case(1, 8192, bw), decode_case(16, 8192, bw), decode_case(64, 2048, bw),
            decode_case(1, 128, bw), prefill_case(2048, peak), prefill_case(8192, peak)]
    rows += [gemv_case(layer, m, bw) for layer in GEMV_LAYERS for m in (1, 8)]
    print(f"\n{'case':<44} {'tuili us':>9} {'torch us':>9} {'rate':>14} {'of ceiling':>10}")
    for r in rows:
        rate = (f"{r['tuili_gbs']:.0f} GB/s" if "tuili_gbs" in r else f"{r['tuili_tflops']:.0f} TFLOP/s")
        print(f"{r['case']:<44} {r['tuili_us']:9.1f} {r['torch_us']:9.1f} {rate:>14} "
              f"{r['of_ceiling']:9.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceilings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
