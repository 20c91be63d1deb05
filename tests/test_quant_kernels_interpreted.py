"""The quantized-linear Triton kernels (kernels/triton_quant.py) on the CPU under Triton's
interpreter, against their torch references, on odd shapes, every group size and padded rows.
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


@pytest.mark.parametrize("group,block_k", [(32, 32), (64, 32), (128, 64), (96, 64), (384, 64)],
                         ids=["g32", "g64-two-tiles", "g128", "g96-straddles", "per-channel"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_gemv(m, group, block_k):
    torch.manual_seed(m)
    n, k = 40, 384  # 40 columns: the second block of 32 is padded
    qweight, scales, zeros = int4_weight(n, k, group)
    x, bias = torch.randn(m, k), torch.randn(n) if m == 3 else None
    out = triton_quant.int4_gemv(x, qweight, scales, zeros, group, bias, block_n=32,
                                 block_k=block_k)
    ref = reference_quant.int4_linear(x, qweight, scales, zeros, group, bias)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 5])
def test_scaled_gemv(kind, m):
    torch.manual_seed(m)
    n, k = 37, 200
    w = torch.randn(n, k)
    q, scale = (quantize_per_row(w, torch.int8, 127) if kind == "int8"
                else quantize_per_row(w, FP8, FP8_MAX))
    x, bias = torch.randn(m, k), torch.randn(n)
    out = triton_quant.scaled_gemv(x, q, scale, bias, block_n=16, block_k=64)
    torch.testing.assert_close(out, reference_quant.scaled_linear(x, q, scale, bias),
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
