"""The quantized-linear Triton kernels (kernels/triton_quant.py) on the CPU under Triton's
interpreter, against their torch references, on odd shapes, every group size and padded rows.
Skipped where Triton is not installed or a GPU is (tests/gpu runs them compiled)."""

import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("on a GPU machine tests/gpu runs the kernels compiled", allow_module_level=True)
if "tuili.kernels.triton_quant" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels were imported compiled", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # read as the kernel module is imported, just below
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

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
