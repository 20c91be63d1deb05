"""Tiles of the quantized decode GEMVs (kernels/triton_quant.py) over Llama-3.1-8B's projection
shapes: microseconds per launch and the share of the measured read bandwidth, for each candidate
tile (4-bit: columns x K tile x warps, and how many programs a SM gets through the split of K;
int8 / FP8: rows x K tile x warps) at one row, and the default tiles (int4_config /
scaled_config, chosen from this GPU's traits) at 1 and 8 rows.

Each case is a CUDA graph of R back-to-back launches over R copies of the weight (>= 256 MB in
all, so the weights stream from HBM and not from L2, as in a whole model); time per launch =
replay time / R. Under ~90 s on an H100 or H200 (most of it compiling the candidates).

    python3 benchmarks/quant_gemv_sweep.py [--shapes qkv,o,gate_up,down] [--formats int4,int8,fp8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import _read_bandwidth, cuda_time  # noqa: E402
from tuili.kernels import triton_quant  # noqa: E402
from tuili.kernels.triton_quant import QuantGemvConfig  # noqa: E402
from tuili.kernels.tuning import gpu_traits  # noqa: E402
from tuili.quantization.fp8 import FP8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128
# 4-bit: (columns, K tile, warps, prefetch); each at several programs per SM (the split of K
# follows).
INT4_TILES = [(128, 128, 4, False), (128, 128, 4, True), (128, 64, 4, True), (256, 64, 4, False),
              (512, 32, 4, False), (512, 32, 4, True), (256, 128, 8, False), (64, 128, 4, False)]
PROGRAMS_PER_SM = (3, 5, 7)
# int8 / FP8: (rows, K tile, warps).
SCALED_TILES = [(1, 4096, 4), (2, 4096, 8), (4, 4096, 8), (2, 2048, 4), (4, 2048, 8),
                (4, 1024, 4), (8, 1024, 4), (8, 2048, 8)]
TOTAL_BYTES = 256 << 20
DEVICE = "cuda"


def per_launch(fn, copies: int) -> float:
    """Microseconds a launch, or infinity for a tile the compiler or the SM cannot take."""
    try:
        return cuda_time(lambda: [fn(i) for i in range(copies)], repeat=15,
                         graph=True) / copies * 1e6
    except Exception as e:  # a tile out of registers or shared memory: reported, skipped
        print(f"    {type(e).__name__}: {str(e)[:100]}", flush=True)
        return float("inf")


def split_for(n: int, k: int, block_n: int, block_k: int, per_sm: int, sms: int) -> int:
    columns = -(-n // block_n)
    return max(1, min(-(-k // block_k), round(per_sm * sms / columns)))


def report(label: str, results: list, nbytes: int, read: float, default_us: float,
           default_name: str) -> None:
    results = sorted(results)
    best = ", ".join(f"{name} {us:.1f} us ({nbytes / (us * 1e-6) / read:.0%})"
                     for us, name in results[:3])
    print(f"{label}: best {best}; default {default_name} {default_us:.1f} us "
          f"({nbytes / (default_us * 1e-6) / read:.0%})", flush=True)


def sweep_int4(name: str, n: int, k: int, read: float, sms: int) -> tuple[float, float]:
    copies = max(1, min(64, -(-TOTAL_BYTES // (n * k // 2))))
    qws = [torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=DEVICE)
           for _ in range(copies)]
    s = torch.rand(k // GROUP, n, device=DEVICE, dtype=torch.float16) * 0.01
    z = torch.full((k // GROUP, n), 8.0, device=DEVICE, dtype=torch.float16)
    nbytes = n * k // 2 + 2 * s.numel() * 2
    out = []
    for m in (1, 8):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        default = triton_quant.int4_config(m, n, k, GROUP)
        d_us = per_launch(lambda i: triton_quant.int4_gemv(x, qws[i], s, z, GROUP, None, default),
                          copies)
        out.append(d_us)
        results = []
        if m == 1:
            for bn, bk, w, pf in INT4_TILES:
                for per_sm in PROGRAMS_PER_SM:
                    split = split_for(n, k, bn, bk, per_sm, sms)
                    cfg = QuantGemvConfig(bn, bk, split, num_warps=w, prefetch=pf)
                    us = per_launch(lambda i: triton_quant.int4_gemv(x, qws[i], s, z, GROUP, None,
                                                                     cfg), copies)
                    results.append((us, f"{bn}x{bk}/{w}w{' prefetch' if pf else ''} split {split}"))
        else:
            for bn, bk, split in ((64, 128, 4), (128, 128, 2), (128, 128, 6), (128, 64, 8)):
                cfg = QuantGemvConfig(bn, bk, split, use_dot=True)
                us = per_launch(lambda i: triton_quant.int4_gemv(x, qws[i], s, z, GROUP, None,
                                                                 cfg), copies)
                results.append((us, f"dot {bn}x{bk} split {split}"))
        dname = (f"{'dot ' if default.use_dot else ''}{default.block_n}x{default.block_k}/"
                 f"{default.num_warps}w{' prefetch' if default.prefetch else ''} "
                 f"split {default.split_k}")
        report(f"{name} [{n}, {k}] int4 g{GROUP} {m} row{'s' if m > 1 else ''}", results, nbytes,
               read, d_us, dname)

    return out[0], out[1]


def sweep_scaled(name: str, n: int, k: int, dtype: torch.dtype, read: float
                 ) -> tuple[float, float]:
    copies = max(1, min(64, -(-TOTAL_BYTES // (n * k))))
    ws = [torch.randn(n, k, device=DEVICE).to(dtype) for _ in range(copies)]
    scale = torch.rand(n, device=DEVICE) * 0.01
    label = str(dtype).removeprefix("torch.")
    out = []
    for m in (1, 8):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        default = triton_quant.scaled_config(m, n, k)
        d_us = per_launch(lambda i: triton_quant.scaled_gemv(x, ws[i], scale, None, default),
                          copies)
        out.append(d_us)
        results = []
        tiles = [(*t, True) for t in SCALED_TILES] if m == 1 else \
            [(16, 256, 4, True), (32, 256, 4, True), (16, 512, 4, True)]
        if m == 1 and dtype == torch.int8:  # the int-to-float conversion beside the bits
            tiles += [(*t, False) for t in SCALED_TILES[1:4]]
        for bn, bk, w, bits in tiles:
            cfg = QuantGemvConfig(bn, bk, num_warps=w, use_dot=m > 1, num_stages=3 if m > 1 else 1,
                                  int8_bits=bits)
            us = per_launch(lambda i: triton_quant.scaled_gemv(x, ws[i], scale, None, cfg), copies)
            results.append((us, f"{'dot ' if m > 1 else ''}{bn}x{bk}/{w}w"
                                f"{'' if bits else ' converted'}"))
        dname = f"{'dot ' if default.use_dot else ''}{default.block_n}x{default.block_k}/" \
                f"{default.num_warps}w"
        report(f"{name} [{n}, {k}] {label} {m} row{'s' if m > 1 else ''}", results, n * k, read,
               d_us, dname)

    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--formats", default="int4,int8,fp8")
    args = p.parse_args()
    start = time.perf_counter()
    gpu = gpu_traits()
    read = _read_bandwidth(torch.ones(2**31, dtype=torch.bfloat16, device=DEVICE))
    torch.cuda.empty_cache()
    print(f"{gpu.name}: {gpu.sms} SMs, peak {gpu.peak_bandwidth / 1e12:.2f} TB/s, measured read "
          f"{read / 1e12:.2f} TB/s, fast memory {gpu.fast_memory}", flush=True)
    totals: dict[str, list[float]] = {}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for fmt in args.formats.split(","):
            if fmt == "int4":
                us = sweep_int4(name, n, k, read, gpu.sms)
            else:
                us = sweep_scaled(name, n, k, torch.int8 if fmt == "int8" else FP8, read)
            totals.setdefault(fmt, [0.0, 0.0])
            totals[fmt] = [a + b for a, b in zip(totals[fmt], us)]
    # A layer holds each projection once; 32 layers make Llama-3.1-8B's linears (LM head aside).
    bits = {"int4": 4 + 32 / GROUP, "int8": 8, "fp8": 8}
    params = sum(n * k for n, k in (SHAPES[s] for s in args.shapes.split(",")))
    for fmt, (one, eight) in totals.items():
        floor = 32 * params * bits[fmt] / 8 / read * 1e3
        print(f"default tiles, {fmt}: 32 layers' linears {32 * one / 1e3:.2f} ms at 1 row "
              f"(read floor {floor:.2f} ms, {floor / (32 * one / 1e3):.0%}), "
              f"{32 * eight / 1e3:.2f} ms at 8 rows")
    print(f"swept in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
