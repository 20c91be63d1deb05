"""Decode GEMVs on AVX512-VNNI CPUs (cpu_vnni.cpp): 4- and 8-bit weights times activations
quantized to int8 (a scale per 16 inputs), integer dot products, as llama.cpp's Q4_1 x Q8 runs.

The C++ is compiled on first use by torch.utils.cpp_extension (a compiler and ninja needed; 30-50 s
once on 2 cores, then cached in torch's extensions folder). Where it cannot be built or the CPU
lacks AVX512-VNNI, `module()` is None and the callers keep torch's kernels. TUILI_CPU_VNNI=0
turns it off. The packing below is the layout the C++ reads (see its header)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
GROUP, TILE = 32, 16
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@functools.cache
def module():
    """The compiled extension, or None (not x86 with AVX512-VNNI, turned off, or no build)."""
    if os.environ.get("TUILI_CPU_VNNI", "1") == "0" or not set(NEEDS) <= _cpu_flags():
        return None
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma",
                 "-fopenmp"]  # at::parallel_for inlines its OpenMP region: torch's libgomp runs it
        return cpp_extension.load("tuili_cpu_vnni", [str(Path(__file__).with_suffix(".cpp"))],
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels serve
        log.warning("the AVX512-VNNI CPU kernels could not be built (%s); using torch's", e)
        return None


def fits(n: int, k: int) -> bool:
    """Whether a weight [n, k] has the kernels' shape (whole tiles and groups)."""
    return n % TILE == 0 and k % GROUP == 0


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w = (q - 8) * scale + zero ([N, K] q in 0..15, [N, K/32] scale and zero) in the 4-bit
    layout: uint8 [N/16, K/32, 320], w = d * q + m with d = scale, m = zero - 8 * scale (fp16)."""
    n, k = q.shape
    t, g = n // TILE, k // GROUP
    # (tile, row, group, c, half, b) -> (tile, group, c, row, b, half): byte 64c + 4r + b holds
    # inputs 8c + b (low nibble) and 8c + 4 + b (high).
    v = q.to(torch.uint8).reshape(t, TILE, g, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    nibbles = (v[..., 0] | (v[..., 1] << 4)).reshape(t, g, 256)

    def per_tile(a: torch.Tensor) -> torch.Tensor:  # [N, G] -> uint8 [T, G, 32]
        a = a.float().reshape(t, TILE, g).permute(0, 2, 1).to(torch.float16).contiguous()
        return a.view(torch.uint8).reshape(t, g, 2 * TILE)

    m = zero.float() - 8 * scale.float()
    return torch.cat([nibbles, per_tile(scale), per_tile(m)], -1).contiguous()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] (-127..127) in the 8-bit layout: uint8 [N/16, K/32, 512] of q + 128."""
    n, k = q.shape
    t, g = n // TILE, k // GROUP
    v = (q.to(torch.int16) + 128).to(torch.uint8).reshape(t, TILE, g, 8, 4).permute(0, 2, 3, 1, 4)
    return v.reshape(t, g, 8 * TILE * 4).contiguous()


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] @ w.T -> [M, N] in x's dtype, w the 4-bit weight `packed` holds."""
    return module().int4_gemv(x, packed, n)


def int8_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (scale[:, None] * q).T -> [M, N] in x's dtype (scale float32 [N])."""
    return module().int8_gemv(x, packed, scale)
