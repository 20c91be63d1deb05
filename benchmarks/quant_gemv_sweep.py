"""Tiles of the quantized decode GEMVs (kernels/triton_quant.py) at one row, alone, over Llama-3.1-8B's
projection shapes: microseconds per launch (CUDA-graph replays) and the share of read bandwidth.

    python3 benchmarks/quant_gemv_sweep.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time  # noqa: E402
from tuili.kernels import triton_quant  # noqa: E402
from tuili.quantization.fp8 import FP8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
READ = 4.18e12


def main() -> None:
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    for name, (n, k) in SHAPES.items():
        xk = x[:, :k].contiguous()
        qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        s = torch.rand(k // 128, n, device="cuda", dtype=torch.bfloat16)
        z = torch.full((k // 128, n), 8.0, device="cuda", dtype=torch.bfloat16)
        results = []
        for bn, bk in itertools.product((32, 64, 128, 256), (64, 128, 256)):
            us = cuda_time(lambda: triton_quant.int4_gemv(xk, qw, s, z, 128, None, bn, bk),
                           repeat=30, graph=True) * 1e6
            results.append((us, f"int4 {bn}x{bk}"))
        bytes4 = n * k / 2 + 2 * s.numel() * 2
        best = sorted(results)[:3]
        print(f"{name} {n}x{k} int4: " + ", ".join(
            f"{c} {u:.1f} us ({bytes4 / (u * 1e-6) / READ:.0%})" for u, c in best)
            + f"; default 64x64 {dict((c, u) for u, c in results)['int4 64x64']:.1f} us",
            flush=True)
        for dtype in (torch.int8, FP8):
            w = torch.randn(n, k, device="cuda").to(dtype)
            scale = torch.rand(n, device="cuda")
            results = []
            for bn, bk in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024)):
                us = cuda_time(lambda: triton_quant.scaled_gemv(xk, w, scale, None, bn, bk),
                               repeat=30, graph=True) * 1e6
                results.append((us, f"{bn}x{bk}"))
            best = sorted(results)[:3]
            print(f"{name} {n}x{k} {str(dtype).removeprefix('torch.')}: " + ", ".join(
                f"{c} {u:.1f} us ({n * k / (u * 1e-6) / READ:.0%})" for u, c in best)
                + f"; default 16x128 n/a", flush=True)
            del w


if __name__ == "__main__":
    main()
