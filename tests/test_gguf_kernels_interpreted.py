"""The GGUF block kernels (kernels/triton_gguf.py) on the CPU under Triton's interpreter, against
the gguf package's own dequantizer on random blocks: every block type, rows that pad the last
tile, 1 to 8 decode rows, bias, the tiled GEMM and the dequantize path of larger steps, and a merged layer whose
parts differ in type. Skipped where Triton is not installed or a GPU is (tests/gpu runs them
compiled)."""


import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter

use_interpreter("tuili.kernels.triton_gguf")
pytestmark = IGNORE_SCALAR_READS

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from tests.gguf_models import random_blocks  # noqa: E402
from tuili.kernels import triton_gguf  # noqa: E402
from tuili.kernels.reference_gguf import TYPES, planes_from_blocks  # noqa: E402
from tuili.layers.linear import Linear  # noqa: E402
from tuili.quantization.gguf import GgufTensor, prepare_gguf  # noqa: E402


def weight(qtype: str, rows: int, cols: int, seed: int = 0):
    """(planes, the gguf package's dequantized [rows, cols] float32)."""
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    ref = torch.from_numpy(dequantize(raw, Q[qtype])).reshape(rows, cols)
    return planes_from_blocks(torch.from_numpy(raw), qtype, cols), ref


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("qtype", TYPES)
def test_gemv_and_dequantize_match_gguf(qtype):
    # 21 rows: the last tile of 8 (16) is padded; 768 values are 24 (12) pieces, so a tile of
    # 16 pieces is padded too.
    planes, ref_w = weight(qtype, 21, 768)
    close(triton_gguf.gguf_dequantize(planes, torch.float32, block_n=16, pieces=16), ref_w)
    for m, pieces in ((1, None), (3, 16), (8, None)):
        x, bias = torch.randn(m, 768), (torch.randn(21) if m == 3 else None)
        out = triton_gguf.gguf_gemv(x, planes, bias, pieces=pieces)
        close(out, torch.nn.functional.linear(x, ref_w, bias))


@pytest.mark.parametrize("qtype", TYPES)
def test_tiled_gemm_matches_gguf(qtype):
    planes, ref_w = weight(qtype, 40, 512)  # 40 rows: the last tile of 32 padded
    x, bias = torch.randn(20, 512), torch.randn(40)  # 20 rows: two tiles of 16, one padded
    close(triton_gguf.gguf_gemm(x, planes, bias, block_m=16, block_n=32),
          torch.nn.functional.linear(x, ref_w, bias))


def test_larger_steps():
    planes, ref_w = weight("Q4_K", 12, 256)
    x = torch.randn(2, 6, 256)  # 12 rows: past the GEMV, the tiled GEMM
    close(triton_gguf.gguf_linear(x, planes), x @ ref_w.t())
    x = torch.randn(triton_gguf.TILE_MAX_ROWS + 1, 256)  # dequantize, then matmul
    close(triton_gguf.gguf_linear(x, planes), x @ ref_w.t())


def test_merged_layer_of_mixed_types():
    """q/k/v-like parts in Q4_K, Q4_K and Q6_K plus a float part: segments written into their
    columns of one output, whichever kernel a step's rows choose."""
    sizes, cols = [16, 8, 8, 5], 256
    layer = Linear(cols, sizes, bias=True)
    model = torch.nn.ModuleDict({"proj": layer})
    prepare_gguf(model)
    layer.method.use_triton = True
    refs = []
    for part, qtype in enumerate(["Q4_K", "Q4_K", "Q6_K", None]):
        if qtype is None:
            w = torch.randn(sizes[part], cols) * 0.02
            layer.weight.weight_loader(layer.weight, w, part)
        else:
            raw = random_blocks(qtype, sizes[part], cols, np.random.default_rng(part))
            layer.weight.weight_loader(layer.weight, GgufTensor(qtype, torch.from_numpy(raw), cols),
                                       part)
            w = torch.from_numpy(dequantize(raw, Q[qtype])).reshape(sizes[part], cols)
        refs.append(w)
    layer.bias.data.copy_(torch.randn(sum(sizes)))
    layer.process_weights_after_loading()
    assert [s.rows for s in layer.method.segments] == [24, 8, 5]
    ref_w = torch.cat(refs)
    for m in (2, 11, 300):  # the GEMV, the tiled GEMM, dequantize + matmul
        x = torch.randn(m, cols)
        close(layer(x), torch.nn.functional.linear(x, ref_w, layer.bias))
    with pytest.raises(ValueError, match=r"does not fit part 1 \(8, 256\)"):
        layer.method.load_part(None, torch.zeros(9, cols), 1)
