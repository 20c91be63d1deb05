"""kernels/cpu_vnni.cpp against torch: the 4- and 8-bit GEMVs against float64 matmuls of the same
int8-quantized inputs, the fused decode layer against its steps in torch ops (the same GEMVs),
and the fallback to torch's kernels where the extension is absent."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from tuili.kernels import cpu_vnni
from tuili.layers.int4 import Int4Weight
from tuili.layers.linear import Int4CpuMethod
from tuili.models.gguf_file import open_gguf, unpack_q4
from tuili.quantization.int8 import Int8HeadMethod

needs_vnni = pytest.mark.skipif(cpu_vnni.module() is None,
                                reason="no AVX512-VNNI CPU, or the extension could not be built")


def quantized_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' int8 inputs (a scale per 16), dequantized [M, K], and each group of 32's
    exact sum [M, K/32] (float64). The rounding in float32 as the kernel does it (x times
    1 / d): ties of x / d fall the same way."""
    g = x.float().reshape(x.shape[0], -1, 16)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    xq = torch.round(g * inv)
    sums = g.double().reshape(x.shape[0], -1, 32).sum(-1)
    return (xq.double() * d.double()).reshape(x.shape), sums


def random_int4(n: int, k: int, seed: int = 0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    return Int4Weight(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32),
                      torch.rand(n, k // 32, generator=g) * 0.02,
                      (torch.rand(n, k // 32, generator=g) - 0.5) * 0.05)


def int4_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x @ w.T as the kernel reads w (d = scale, m = zero - 8 scale in fp16) and x (int8 groups
    times their scale, the offsets times the exact group sums), in float64."""
    d = w.scale.half().double().repeat_interleave(32, 1)
    m = (w.zero - 8 * w.scale).half().double()
    xd, sums = quantized_input(x)
    return xd @ (d * w.q.double()).t() + sums @ m.t()


@needs_vnni
@pytest.mark.parametrize("rows", [1, 4])
def test_int4_gemv_matches_reference(gguf_path, rows):
    """A real Q4_1 tensor of SmolLM2 (ffn_down, [576, 1536]) and random ones of its other
    shapes; bfloat16 and float32 inputs and outputs."""
    t = next(t for t in open_gguf(gguf_path).reader.tensors if t.tensor_type == Q.Q4_1)
    weights = [unpack_q4(np.asarray(t.data), Q.Q4_1), random_int4(960, 576), random_int4(3072, 576)]
    g = torch.Generator().manual_seed(1)
    for w in weights:
        n, k = w.shape
        packed = cpu_vnni.pack_int4(w.q, w.scale, w.zero)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, k, generator=g).to(dtype)
            ref = int4_reference(x, w)
            out = cpu_vnni.int4_gemv(x, packed, n)
            assert out.dtype == dtype and out.shape == (rows, n)
            # float32 sums in another order, then (bf16) one rounding of the output
            tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
            assert ((out.double() - ref).abs() <= tol * ref.abs() + 1e-5 * ref.abs().max()).all()
            # and what int8 inputs cost against the float input (BENCHMARKS.md: ~1% of the max)
            exact = x.double() @ w.dequantize().double().t()
            assert (out.double() - exact).abs().max() <= 0.03 * exact.abs().max()


@needs_vnni
def test_int8_head_matches_reference():
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(1024, 576, generator=g) * 0.05).bfloat16()
    method = Int8HeadMethod(weight)
    assert method.vnni is not None
    q = method.quantized(weight).double()
    for rows in (1, 3, Int8HeadMethod.MAX_ROWS):
        x = torch.randn(rows, 576, generator=g).bfloat16()
        ref = quantized_input(x)[0] @ (q * method.scale.double()[:, None]).t()
        out = cpu_vnni.int8_gemv(x, method.q, method.float_scale)
        assert out.dtype == torch.bfloat16
        assert ((out.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all()


def layer_reference(x, in_w, post_w, eps, ws, cos, sin, k_all, v_all, n, nh, nkv, d, inter):
    """decode_layer's steps in torch float32 ops, its GEMVs (cpu_vnni.int4_gemv) the same."""
    def norm(h, w):
        return (h * torch.rsqrt(h.pow(2).mean() + eps) * w.float())[None]

    qkv_w, o_w, gu_w, down_w = ws
    qkv = cpu_vnni.int4_gemv(norm(x, in_w), qkv_w, (nh + 2 * nkv) * d)[0].view(-1, d)
    qk = qkv[:nh + nkv]
    qk = qk * cos + qk.roll(d // 2, -1) * sin
    k_new, v_new = qk[nh:].bfloat16(), qkv[nh + nkv:].bfloat16()
    k = torch.cat([k_all[:n - 1], k_new.float()[None]])
    v = torch.cat([v_all[:n - 1], v_new.float()[None]])
    q = qk[:nh].view(nkv, nh // nkv, d)
    p = torch.softmax(torch.bmm(q, k.permute(1, 2, 0)) / math.sqrt(d), -1)
    att = torch.bmm(p, v.transpose(0, 1)).reshape(1, nh * d)
    x = x + cpu_vnni.int4_gemv(att, o_w, x.numel())[0]
    gu = cpu_vnni.int4_gemv(norm(x, post_w), gu_w, 2 * inter)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    return x + cpu_vnni.int4_gemv(h, down_w, x.numel())[0], k_new, v_new


@needs_vnni
@pytest.mark.parametrize("n", [1, 37, 300])  # 300: the heads over the threads
def test_decode_layer_matches_its_steps_in_torch(n):
    """SmolLM2's shapes, random weights: the residual stream, the stored K/V (16-bit cache at
    the slot, widened into history row n - 1) as the torch ops give them."""
    hidden, nh, nkv, d, inter, eps, slot = 576, 9, 3, 64, 1536, 1e-5, 70
    g = torch.Generator().manual_seed(3)
    ws = [cpu_vnni.pack_int4(*vars(random_int4(a, b, seed)).values()) for seed, (a, b) in
          enumerate([((nh + 2 * nkv) * d, hidden), (hidden, nh * d), (2 * inter, hidden),
                     (hidden, inter)])]
    in_w, post_w = (1 + torch.rand(hidden, generator=g)).bfloat16(), torch.rand(hidden).bfloat16()
    angle = torch.rand(d // 2, generator=g) * 6
    cos = torch.cat([angle.cos()] * 2)
    sin = torch.cat([-angle.sin(), angle.sin()])  # folded: the first half's sign flipped
    k_all, v_all = (torch.randn(320, nkv, d, generator=g).bfloat16().float() for _ in range(2))
    k_cache, v_cache = (torch.zeros(128, nkv, d, dtype=torch.bfloat16) for _ in range(2))
    x = torch.randn(hidden, generator=g)
    ref, k_new, v_new = layer_reference(x, in_w, post_w, eps, ws, cos, sin, k_all, v_all, n, nh,
                                        nkv, d, inter)
    cpu_vnni.module().decode_layer(x, in_w, post_w, eps, *ws, cos, sin, k_cache, v_cache, slot,
                                   k_all, v_all, n, d ** -0.5, nh, nkv, d, inter)
    assert torch.equal(k_cache[slot], k_new) and torch.equal(v_cache[slot], v_new)
    assert torch.equal(k_all[n - 1], k_new.float()) and torch.equal(v_all[n - 1], v_new.float())
    assert k_cache.float().abs().sum() == k_new.float().abs().sum()  # nothing else written
    # Float32 sums in another order; an input to a GEMV may land on the other side of an int8
    # rounding step, so the bound is a small fraction of the stream, not float32's epsilon.
    assert (x - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_without_the_extension_torch_kernels_serve(monkeypatch):
    """No compiler, no VNNI or TUILI_CPU_VNNI=0: module() is None, and the int4 layer and the
    int8 head keep torch's kernels (activations in bf16)."""
    monkeypatch.setattr(cpu_vnni, "module", lambda: None)
    w = random_int4(64, 128)
    method = Int4CpuMethod(w)
    assert method.vnni is None and len(method.tensors) == 2  # torch's packing, bf16 scales
    x = torch.randn(2, 128).bfloat16()
    ref = x.double() @ w.dequantize().double().t()
    assert (method.gemv(x).double() - ref).abs().max() <= 0.02 * ref.abs().max()
    head = Int8HeadMethod(torch.randn(64, 128).bfloat16())
    assert head.vnni is None and head.q.dtype == torch.int8 and head.q.shape == (64, 128)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("TUILI_CPU_VNNI", "0")
    cpu_vnni.module.cache_clear()
    try:
        assert cpu_vnni.module() is None
    finally:
        monkeypatch.delenv("TUILI_CPU_VNNI")
        cpu_vnni.module.cache_clear()
