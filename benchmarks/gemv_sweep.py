"""Decode GEMV tile sweep: cuBLAS (F.linear) against the Triton GEMV's tile configurations at 1-8
rows on real layer shapes, and the fused norm prologue and SiLU / residual epilogues against their unfused sequences.

Each case is a CUDA graph of R back-to-back launches over R copies of the weight (R copies take
>= 200 MB, so the weights stream from HBM and not from L2, as in a whole model); time per launch =
replay time / R. Writes one JSON line per case to --out; prints a table per shape.

    python benchmarks/gemv_sweep.py [--out sweep.jsonl] [--shapes llama3-8b/qkv,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time  # noqa: E402
from tuili.kernels import reference, triton_fused, triton_gemv  # noqa: E402
from tuili.kernels.triton_gemv import GemvConfig, gemv  # noqa: E402

# name -> ([out, in] of the weight, the fusion the model uses on it; "gated": norm + silu_and_mul)
SHAPES = {
    "llama3-8b/qkv": ((6144, 4096), "norm"), "llama3-8b/o": ((4096, 4096), "residual"),
    "llama3-8b/gate_up": ((28672, 4096), "gated"), "llama3-8b/down": ((4096, 14336), "residual"),
    "llama3-8b/lm_head": ((128256, 4096), "norm"),
    "smollm2/qkv": ((960, 576), "norm"), "smollm2/o": ((576, 576), "residual"),
    "smollm2/gate_up": ((3072, 576), "gated"), "smollm2/down": ((576, 1536), "residual"),
    "smollm2/lm_head": ((49152, 576), "norm"),
    "qwen3-0.6b/qkv": ((4096, 1024), "norm"), "qwen3-0.6b/o": ((1024, 2048), "residual"),
    "qwen3-0.6b/gate_up": ((6144, 1024), "gated"), "qwen3-0.6b/down": ((1024, 3072), "residual"),
}
ROWS = (1, 2, 4, 8)
FMA = [GemvConfig(bn, bk, w, s) for bn, bk, w, s in [
    (2, 1024, 4, 1), (4, 1024, 8, 1), (4, 512, 4, 1), (8, 512, 4, 1), (16, 256, 4, 1)]]
DOT = [GemvConfig(bn, bk, w, s, use_dot=True) for bn, bk, w, s in [
    (4, 1024, 4, 3), (8, 512, 4, 3), (16, 512, 4, 3), (16, 128, 4, 6), (32, 256, 4, 3),
    (32, 512, 4, 3), (64, 256, 4, 3), (64, 512, 8, 3), (128, 256, 8, 3)]]
READ_BW = 3.0e12
FUSIONS = {"norm": (True, False), "gated": (True, True), "residual": (False, False)}  # norm, gated


def fits(cfg: GemvConfig, m: int) -> bool:
    """Skip FMA tiles whose [rows, BLOCK_N, BLOCK_K] product would not fit in registers."""
    m_pad = 1 << (m - 1).bit_length()
    return cfg.use_dot or m_pad * cfg.block_n * cfg.block_k // (32 * cfg.num_warps) <= 128


def per_launch(fn, copies: int) -> float:
    return cuda_time(lambda: [fn(i) for i in range(copies)], repeat=21, graph=True) / copies


def tried(fn, copies: int) -> float:
    """per_launch, or infinity for a tile the compiler or the SM cannot take."""
    try:
        return per_launch(fn, copies)
    except Exception as e:
        print(f"  {type(e).__name__}: {str(e)[:100]}")
        return float("inf")


def sweep_shape(name: str, out) -> None:
    (n, k), fusion = SHAPES[name]
    nbytes = n * k * 2
    copies = max(1, min(160, -(-200_000_000 // nbytes)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.05 for _ in range(copies)]
    norm_w = torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5
    for m in ROWS:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        cublas = per_launch(lambda i: F.linear(x, ws[i]), copies)
        rows = []
        for cfg in FMA + DOT:
            if not fits(cfg, m):
                continue
            try:
                t = per_launch(lambda i: gemv(x, ws[i], config=cfg), copies)
            except Exception as e:  # a tile the compiler or the SM cannot take
                print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:80]}")
                continue
            rows.append((t, cfg))
        rows.sort(key=lambda r: r[0])
        best_t, best = rows[0]
        y = gemv(x, ws[0], config=best)
        ref = x.float() @ ws[0].float().T
        err = ((y.float() - ref).norm() / ref.norm()).item()
        default = triton_gemv.default_config(m, n, k)
        default_us = (per_launch(lambda i: gemv(x, ws[i], config=default), copies) * 1e6
                      if default else None)
        rec = dict(shape=name, n=n, k=k, m=m, copies=copies, cublas_us=cublas * 1e6,
                   default_us=default_us,
                   best_us=best_t * 1e6, best=str(best), rel_err=err,
                   all=[(str(c), t * 1e6) for t, c in rows])
        rec.update(fused_rows(fusion, x, ws, norm_w, copies, [c for c in FMA + DOT if fits(c, m)]))
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(f"{name:<20} M={m} cuBLAS {cublas * 1e6:8.1f} us ({nbytes / cublas / 1e9:5.0f} GB/s)"
              f"  default {default_us}  gemv {best_t * 1e6:8.1f} us ({nbytes / best_t / READ_BW:4.0%})  {best}  "
              f"err {err:.1e}  fused {rec['fused_us']:.1f} (default {rec['fused_default_us']}) vs "
              f"unfused {rec['unfused_us']:.1f} us ({rec['fused_best']})", flush=True)
    ws.clear()
    torch.cuda.empty_cache()


def fused_rows(fusion: str, x, ws, norm_w, copies: int, configs) -> dict:
    """The fusion this layer gets in the model, against norm kernel / cuBLAS / SiLU / add apart."""
    m = x.shape[0]
    rows, k = ws[0].shape
    norm, gated = FUSIONS[fusion]
    n = rows // 2 if gated else rows
    res = torch.randn(m, n, dtype=torch.bfloat16, device="cuda") if fusion == "residual" else None
    nw = norm_w if norm else None

    # As in the model: the norm's scale comes from the sums of squares the producing GEMV left.
    sumsq = x.float().pow(2).sum(1, keepdim=True) if norm else None

    def fused(i, cfg):
        return gemv(x, ws[i], residual=res, norm_weight=nw, eps=1e-5, gated=gated, config=cfg,
                    sumsq=sumsq)

    def unfused(i):
        y = F.linear(triton_fused.rms_norm(x, norm_w, 1e-5) if norm else x, ws[i])
        y = triton_fused.silu_and_mul(y) if gated else y
        return y if res is None else y + res

    y = F.linear(reference.rms_norm(x, norm_w, 1e-5) if norm else x, ws[0])
    y = reference.silu_and_mul(y) if gated else y
    ref = y if res is None else y + res
    timed = sorted(((tried(lambda i: fused(i, c), copies), c) for c in configs),
                   key=lambda r: r[0])
    default = triton_gemv.default_config(m, n, k, False, gated)
    err = ((fused(0, timed[0][1]).float() - ref.float()).norm() / ref.float().norm()).item()
    return dict(fusion=fusion, fused_us=timed[0][0] * 1e6, fused_best=str(timed[0][1]),
                unfused_us=per_launch(unfused, copies) * 1e6, fused_rel_err=err,
                fused_default_us=(per_launch(lambda i: fused(i, default), copies) * 1e6
                                  if default else None),
                fused_all=[(str(c), t * 1e6) for t, c in timed])


def fused_vs_unfused(name: str, m: int) -> dict:
    """One layer's fusion at m rows with the default tiles, against the unfused sequence."""
    (n, k), fusion = SHAPES[name]
    copies = max(1, min(160, -(-200_000_000 // (n * k * 2))))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.05 for _ in range(copies)]
    norm_w = torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    norm, gated = FUSIONS[fusion]
    default = triton_gemv.default_config(m, n // 2 if gated else n, k, False, gated)
    r = fused_rows(fusion, x, ws, norm_w, copies, [default]) if default else {}
    return dict(fusion=fusion, weight_bytes=n * k * 2, fused_us=r.get("fused_us"),
                unfused_us=r.get("unfused_us"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gemv_sweep.jsonl")
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args()
    torch.manual_seed(0)
    with open(args.out, "w") as out:
        for name in args.shapes.split(","):
            sweep_shape(name, out)


if __name__ == "__main__":
    main()
