"""GPU kernel benchmarks: paged decode attention bandwidth, paged prefill attention FLOP rate and
the fused rope/norm/KV-store kernel and the fused decode GEMVs' weight bandwidth, each against
the measured ceiling and beside torch's own kernels on the same inputs ("before": the tuili kernels
a fused one replaces; for the GEMVs torch is the norm / SiLU kernel, cuBLAS and an add).

    python benchmarks/gpu_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


def decode_case(batch: int, context: int, read_bw: float, copies: int = 1) -> dict:
    """copies > 1: one graph runs the kernel over that many caches in turn (timed per launch), so
    a cache that fits in L2 is not read from L2 on the next replay."""
    sets = [paged([context] * batch) for _ in range(copies)]
    lens = torch.full((batch,), context, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)

    def ours_all():
        for k, v, tables in sets:
            triton_attention.decode_attention(q, k, v, tables, lens, HEAD_DIM ** -0.5, out=out)

    ours = cuda_time(ours_all, graph=True) / copies
    k, v, tables = sets[0]
    ref = cuda_time(lambda: reference.decode_attention(q, k, v, tables, lens, context,
                                                       HEAD_DIM ** -0.5), repeat=5, graph=True)
    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
    where = f", {copies} caches per graph" if copies > 1 else ""
    return dict(case=f"decode attention, batch {batch}, context {context}{where}",
                tuili_us=ours * 1e6, torch_us=ref * 1e6, tuili_gbs=kv_bytes / ours / 1e9,
                of_ceiling=kv_bytes / ours / read_bw)


@triton.jit
def _paged_read_kernel(k_ptr, v_ptr, table, out, per_split, KV_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum one (kv head, split) range of a paged cache, read as the decode kernel reads it (its
    own tile loader), no math."""
    kv_head, split = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = split * per_split
    for start in range(lo, lo + per_split, BLOCK_N):
        k, v, _ = triton_attention._kv_tile(k_ptr, v_ptr, table, kv_head, start, lo + per_split,
                                            KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out + kv_head * tl.num_programs(1) + split, tl.sum(acc))


@triton.jit
def _empty_kernel(out):
    if tl.program_id(0) < 0:
        tl.store(out, 0.0)


def launch_floor_cases(context: int, read_bw: float, copies: int = 4) -> list[dict]:
    """What one launch reading a batch-1 cache of `context` keys can reach, to set beside the
    decode kernel: an empty launch of as many programs (the graph's cost per kernel), and the
    best of a few shapes of a bare read of the same paged bytes (no softmax, no merge), each
    timed per launch in a graph over `copies` caches."""
    sets = [paged([context]) for _ in range(copies)]
    out = torch.zeros(KV_HEADS * 64, device="cuda")
    empty = cuda_time(lambda: [_empty_kernel[(KV_HEADS * 32,)](out) for _ in range(copies)],
                      graph=True) / copies
    best = min(
        cuda_time(lambda: [_paged_read_kernel[(KV_HEADS, splits)](
            k, v, tables, out, context // splits, KV_HEADS=KV_HEADS, HEAD_DIM=HEAD_DIM,
            BLOCK_SIZE=BLOCK, BLOCK_N=block_n, num_warps=warps) for k, v, tables in sets],
            graph=True) / copies
        for splits in (32, 64) for block_n in (32, 64) for warps in (4, 8))
    kv_bytes = context * KV_HEADS * HEAD_DIM * 2 * 2
    return [dict(case=f"empty launch of {KV_HEADS * 32} programs, {copies} per graph",
                 tuili_us=empty * 1e6),
            dict(case=f"bare paged read, batch 1, context {context}, {copies} caches per graph",
                 tuili_us=best * 1e6, tuili_gbs=kv_bytes / best / 1e9,
                 of_ceiling=kv_bytes / best / read_bw)]


def read_case(nbytes: int, read_bw: float, copies: int = 4) -> dict:
    """A plain torch sum over nbytes, one graph running it over `copies` buffers in turn: the
    read ceiling at that size (a kernel reading a few tens of MB ramps up and drains in a time
    comparable to the read itself), to set beside the decode-attention rows."""
    xs = [torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    t = cuda_time(lambda: [x.sum(dtype=torch.float32) for x in xs], graph=True) / copies
    return dict(case=f"read of {nbytes / 1e6:.1f} MB alone (torch sum), {copies} per graph",
                tuili_us=t * 1e6, torch_us=t * 1e6, tuili_gbs=nbytes / t / 1e9,
                of_ceiling=nbytes / t / read_bw)


def rope_case(tokens: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool,
              read_bw: float, repeats: int = 1) -> dict:
    """Norm (optional), rotary and K/V store in one launch, beside the kernels it replaces
    (rotary over q and k, or two RMSNorms and two rotaries, then store_kv) and torch's ops.
    repeats > 1: one graph runs each version that many times (timed per run), so a one-token
    case measures the kernels rather than the replay of a one-node graph."""
    from tuili.kernels import triton_fused, triton_rope
    from tuili.layers.rotary import RotaryEmbedding

    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    rope = RotaryEmbedding(head_dim, 8192, 5e5, None, torch.bfloat16, torch.device("cuda"))
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    cos, sin = rope.lookup(positions)
    k_cache, v_cache = random_cache(-(-tokens // BLOCK) + 1, BLOCK, kv_heads, head_dim)
    slots = torch.randperm(k_cache.shape[0] * BLOCK, device="cuda")[:tokens]
    w = torch.ones(head_dim, dtype=torch.bfloat16, device="cuda")
    q_part, k_part = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
    v_part = qkv[:, heads + kv_heads:]

    def fused():
        triton_rope.rope_and_store(qkv, positions, rope.cos, rope.sin, k_cache, v_cache, slots,
                                   heads, (w, w) if qk_norm else None, 1e-6)

    def before(ops):
        def run():
            if qk_norm:
                q = ops.apply_rotary(ops.rms_norm(q_part.reshape(-1, head_dim), w, 1e-6)
                                     .view(tokens, heads, head_dim), cos, sin)
                k = ops.apply_rotary(ops.rms_norm(k_part.reshape(-1, head_dim), w, 1e-6)
                                     .view(tokens, kv_heads, head_dim), cos, sin)
            else:
                q, k = ops.apply_rotary(qkv[:, :heads + kv_heads], cos, sin).split(
                    [heads, kv_heads], 1)
            store = triton_attention.store_kv if ops is triton_fused else reference.store_kv
            store(k, v_part, k_cache, v_cache, slots)
            return q
        return run

    def repeated(fn):
        return lambda: [fn() for _ in range(repeats)]

    ours = cuda_time(repeated(fused), graph=True) / repeats
    prev = cuda_time(repeated(before(triton_fused)), graph=True) / repeats
    ref = cuda_time(repeated(before(reference)), graph=True) / repeats
    nbytes = 2 * tokens * head_dim * (2 * (heads + 2 * kv_heads) + 2)  # qkv, cos, sin in; q, k, v out
    norm = "q/k norm + " if qk_norm else ""
    where = f", {repeats} per graph" if repeats > 1 else ""
    return dict(case=f"{norm}rope + KV store, {heads}/{kv_heads} heads, {tokens} tokens{where}",
                tuili_us=ours * 1e6, before_us=prev * 1e6, torch_us=ref * 1e6,
                tuili_gbs=nbytes / ours / 1e9, of_ceiling=nbytes / ours / read_bw)


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


def gemv_case(layer: str, m: int, read_bw: float) -> dict | None:
    """None where the shape rule leaves the layer to cuBLAS and the separate kernels."""
    r = fused_vs_unfused(layer, m)
    if r["fused_us"] is None:
        return None
    fused, unfused = r["fused_us"], r["unfused_us"]
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
    rows = [decode_case(1, 8192, bw), decode_case(1, 8192, bw, copies=4),
            read_case(8192 * KV_HEADS * HEAD_DIM * 2 * 2, bw), *launch_floor_cases(8192, bw),
            decode_case(1, 32768, bw), decode_case(16, 8192, bw), decode_case(64, 2048, bw),
            decode_case(1, 128, bw, copies=8), prefill_case(2048, peak), prefill_case(8192, peak),
            rope_case(1, HEADS, KV_HEADS, HEAD_DIM, False, bw, repeats=8),
            rope_case(1, 16, 8, 128, True, bw, repeats=8),  # Qwen3-0.6B
            rope_case(2048, HEADS, KV_HEADS, HEAD_DIM, False, bw),
            rope_case(2048, 16, 8, 128, True, bw)]
    gemvs = [gemv_case(layer, m, bw) for layer in GEMV_LAYERS for m in (1, 8)]
    rows += [r for r in gemvs if r is not None]
    print(f"\n{'case':<56} {'tuili us':>9} {'before us':>9} {'torch us':>9} {'rate':>14} "
          f"{'of ceiling':>10}")
    for r in rows:
        rate = (f"{r['tuili_gbs']:.0f} GB/s" if "tuili_gbs" in r
                else f"{r['tuili_tflops']:.0f} TFLOP/s" if "tuili_tflops" in r else "")
        before = f"{r['before_us']:9.1f}" if "before_us" in r else f"{'':9}"
        torch_us = f"{r['torch_us']:9.1f}" if "torch_us" in r else f"{'':9}"
        share = f"{r['of_ceiling']:9.0%}" if "of_ceiling" in r else ""
        print(f"{r['case']:<56} {r['tuili_us']:9.1f} {before} {torch_us} {rate:>14} {share}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceilings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
