"""The quantized-linear Triton kernels (kernels/triton_quant.py) on the CPU under Triton's
interpreter, against their torch references, on odd shapes, every group size and scale path,
split K, padded rows and columns, 1..8 rows in both the FMA and the tensor-core forms.
Skipped where Triton is not installed or a GPU is (tests/gpu runs them compiled)."""

import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter

use_interpreter("tuili.kernels.triton_quant")
pytestmark = IGNORE_SCALAR_READS

from tuili.kernels import reference_quant, triton_quant  # noqa: E402
from tuili.quantization.fp8 import FP8, FP8_MAX, quantize_per_row  # noqa: E402
from tuili.quantization.int4 import quantize_rtn  # noqa: E402
from tuili.quantization.packing import pack_rows  # noqa: E402


def int4_weight(n: int, k: int, group: int):
    scales, zeros, q = quantize_rtn(torch.randn(n, k), group)
    return pack_rows(q.t()), scales.t().contiguous(), zeros.t().contiguous()


C = triton_quant.QuantGemvConfig


# (n, k, group, config): columns padded in the last tile; K not a multiple of the tile; every
# scale path (a tile inside one group, a scale per word row, a scale per row of any length:
# act-order's padded runs); K split in ranges (the last arriving range adds the parts); the
# next K tile prefetched (one row).
INT4_CASES = {
    "g32-split3": (40, 192, 32, C(32, 32, split_k=3)),
    "g64-word-rows-k320-prefetch": (40, 320, 64, C(32, 128, split_k=2, prefetch=True)),
    "g128-wide": (72, 384, 128, C(64, 128)),
    "per-channel-k200-prefetch": (24, 200, -1, C(16, 64, split_k=2, prefetch=True)),
    "g12-any-length-prefetch": (40, 96, 12, C(32, 32, split_k=2, prefetch=True)),
    "g96-straddles": (40, 288, 96, C(32, 64, split_k=3)),
}


# One row (the FMA form in the words' layout), a few rows (the FMA form over rows) and the
# tensor-core form, for every case.
FORMS = [(1, False), (3, False), (8, True)]


@pytest.mark.parametrize("m,dot,case", [(m, dot, case) for case in INT4_CASES for m, dot in FORMS]
                         + [(5, True, "g32-split3")])
def test_int4_gemv(m, dot, case):
    n, k, group, cfg = INT4_CASES[case]
    if dot:
        cfg = C(cfg.block_n, cfg.block_k, cfg.split_k, use_dot=True)
    torch.manual_seed(m)
    g = k if group == -1 else group
    qweight, scales, zeros = int4_weight(n, k, g)
    x, bias = torch.randn(m, k), torch.randn(n) if m % 2 else None
    out = triton_quant.int4_gemv(x, qweight, scales, zeros, g, bias, cfg)
    ref = reference_quant.int4_linear(x, qweight, scales, zeros, g, bias)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if cfg.split_k > 1:  # the last range left its tickets at 0: a second launch agrees
        again = triton_quant.int4_gemv(x, qweight, scales, zeros, g, bias, cfg)
        torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)


def test_int4_gemv_default_tiles():
    """int4_config's tiles (the H100's traits on a CPU tensor) on a small layer, at 1 and 8 rows."""
    torch.manual_seed(0)
    n, k, group = 96, 512, 128
    qweight, scales, zeros = int4_weight(n, k, group)
    for m in (1, 8):
        x = torch.randn(m, k)
        torch.testing.assert_close(triton_quant.int4_gemv(x, qweight, scales, zeros, group),
                                   reference_quant.int4_linear(x, qweight, scales, zeros, group),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
                         ids=["qkv", "o", "gate_up", "down"])
def test_tiles_fill_every_sm(shape):
    """Llama-3.1-8B's layers at one row: the 4-bit GEMV's programs (columns x ranges of K) fill
    every SM several times over on both cards, more so where each SM must hold more bytes in
    flight (the H200); the int8/FP8 GEMV's too; tiles of words stay inside one 128-group."""
    from tuili.kernels import tuning

    n, k = shape
    programs = {}
    for gpu in (tuning.H100, tuning.H200):
        cfg = triton_quant.int4_config(1, n, k, 128, gpu)
        assert 128 % cfg.block_k == 0 and not cfg.use_dot
        k_split = -(-k // cfg.split_k // cfg.block_k) * cfg.block_k
        programs[gpu.name] = -(-n // cfg.block_n) * -(-k // k_split)
        assert programs[gpu.name] >= 3 * gpu.sms
        scaled = triton_quant.scaled_config(1, n, k, gpu)
        assert -(-n // scaled.block_n) >= 4 * gpu.sms
    assert programs[tuning.H200.name] >= programs[tuning.H100.name]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m,cfg", [(1, C(4, 64)), (1, C(4, 64, int8_bits=False)),
                                   (1, C(2, 256, num_warps=8)), (3, C(4, 64)),
                                   (5, C(16, 64, use_dot=True)), (8, None)],
                         ids=["one-row", "one-row-converted", "one-tile", "rows", "dot",
                              "default"])
def test_scaled_gemv(kind, m, cfg):
    torch.manual_seed(m)
    n, k = 37, 200  # 37 rows: the last tile padded; K = 200: not a multiple of the tile
    w = torch.randn(n, k)
    q, scale = (quantize_per_row(w, torch.int8, 127) if kind == "int8"
                else quantize_per_row(w, FP8, FP8_MAX))
    x, bias = torch.randn(m, k), torch.randn(n) if m != 3 else None
    out = triton_quant.scaled_gemv(x, q, scale, bias, cfg)
    torch.testing.assert_close(out, reference_quant.scaled_linear(x, q, scale, bias),
                               atol=1e-4, rtol=1e-4)


def test_gemvs_reject_too_many_rows():
    qweight, scales, zeros = int4_weight(16, 64, 32)
    with pytest.raises(ValueError, match="up to 8 rows"):
        triton_quant.int4_gemv(torch.randn(9, 64), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="does not fit"):
        triton_quant.scaled_gemv(torch.randn(1, 64), torch.zeros(16, 32, dtype=torch.int8),
                                 torch.ones(16))


def test_int4_dequantize_and_large_steps():
    torch.manual_seed(0)
    n, k, group = 72, 160, 32
    qweight, scales, zeros = int4_weight(n, k, group)
    w = triton_quant.int4_dequantize(qweight, scales, zeros, group, torch.float32, 32, 64)
    torch.testing.assert_close(w.t(), reference_quant.dequantize_int4(qweight, scales, zeros,
                                                                      group))
    x = torch.randn(2, 11, k)  # 22 rows: the dequantize + matmul path
    torch.testing.assert_close(triton_quant.int4_linear(x, qweight, scales, zeros, group),
                               reference_quant.int4_linear(x, qweight, scales, zeros, group),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["int8", "fp8", "int4", "gptq-act-order"])
def test_linear_methods_take_the_kernels(method, monkeypatch):
    """Each method's GPU path (use_triton, as quantization.prepare sets it on CUDA) gives its
    CPU path's output: decode rows through the GEMVs, a larger step through dequantize + matmul."""
    from tuili.layers.linear import Linear
    from tuili.quantization import method_class
    from tuili.quantization.config import QuantConfig, from_hf

    torch.manual_seed(0)
    k, sizes = 256, [64, 32, 32]
    layer = Linear(k, sizes)
    layer.params_dtype, layer.params_device = torch.float32, torch.device("cpu")
    if method == "gptq-act-order":
        qc = from_hf({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}, "t")
    else:
        qc = QuantConfig(method, group_size=128 if method == "int4" else -1)
    layer.method = method_class(qc)(qc, layer)
    layer.method.create_weights(layer)
    if method == "gptq-act-order":
        scales, zeros, q = quantize_rtn(torch.randn(128, k), 64)
        perm = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // 64).int()
        for part, (a, b) in enumerate([(0, 64), (64, 96), (96, 128)]):
            layer.qweight.weight_loader(layer.qweight, pack_rows(q[a:b].t()), part)
            layer.qzeros.weight_loader(layer.qzeros, _pack_cols(zeros[a:b].t().clamp(min=1) - 1), part)
            layer.scales.weight_loader(layer.scales, scales[a:b].t(), part)
            layer.g_idx.weight_loader(layer.g_idx, g_idx, part)
    else:
        layer.weight.data.normal_()
    layer.process_weights_after_loading()
    for rows in (1, 3, 12):
        x = torch.randn(rows, k)
        layer.method.use_triton = False
        ref = layer(x)
        layer.method.use_triton = True
        torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-4)


def _pack_cols(z: torch.Tensor) -> torch.Tensor:
    return pack_rows(z.t().contiguous()).t().contiguous()  # columns 8c..8c+7 in word c
