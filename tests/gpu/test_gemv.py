"""The decode GEMV and its fusions against the reference ops (prologue rounded the same way, the dot
in float32), on odd shapes and 1..8 rows, outputs poisoned first."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tuili.kernels import reference, triton_gemv  # noqa: E402
from tuili.kernels.triton_gemv import GemvConfig  # noqa: E402

FMA = GemvConfig(block_n=2, block_k=1024)
DOT = GemvConfig(block_n=32, block_k=256, num_stages=3, use_dot=True)
WHOLE = GemvConfig(block_n=2, block_k=4096, num_warps=8)  # each row in one tile (k <= 4096)


def expected(x, w, bias, residual, norm_w, gated):
    """The unfused path's roundings: the norm in the model dtype, one rounding after the bias,
    silu_and_mul and the residual add as their own kernels round."""
    if norm_w is not None:
        x = reference.rms_norm(x, norm_w, 1e-5)
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    if gated:
        y = reference.silu_and_mul(y)
    return y if residual is None else y + residual


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(37, 100), (960, 576), (4113, 1000), (129, 3000)])
@pytest.mark.parametrize("fusion", ["plain", "norm", "norm+gated", "gated+bias", "bias+residual"])
@pytest.mark.parametrize("config", [None, FMA, DOT, WHOLE], ids=["default", "fma", "dot", "whole"])
def test_gemv_matches_reference(m, n, k, fusion, config):
    torch.manual_seed(m * 7 + n + k)
    gated, norm = "gated" in fusion, "norm" in fusion
    if config is None and triton_gemv.default_config(m, n, k, norm, gated) is None:
        pytest.skip("cuBLAS serves this shape")
    rows = 2 * n if gated else n
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    bias = torch.randn(rows, device="cuda", dtype=torch.bfloat16) if "bias" in fusion else None
    res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) if "residual" in fusion else None
    norm_w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5 if norm else None
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    triton_gemv.gemv(x, w, bias, res, norm_w, 1e-5, gated, config=config, out=out)
    ref = expected(x, w, bias, res, norm_w, gated)
    assert not out.isnan().any()
    # Only the float32 summation order differs: at most a unit in the last bf16 place, mostly none.
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)
    assert (out == ref).float().mean() > 0.9


def test_gemv_fp16_and_strided_input():
    x = torch.randn(3, 2 * 640, device="cuda", dtype=torch.float16)[:, :640]  # a strided view
    w = torch.randn(300, 640, device="cuda", dtype=torch.float16) * 0.04
    out = triton_gemv.gemv(x, w)
    torch.testing.assert_close(out, expected(x, w, None, None, None, False), atol=1e-2, rtol=1e-2)


def test_gemv_rejects_bad_shapes():
    w = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="1..8 rows"):
        triton_gemv.gemv(torch.randn(9, 32, device="cuda", dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="does not fit"):
        triton_gemv.gemv(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w)


def test_linear_fused_and_unfused_paths_agree():
    """The layer API: the same calls with the most rows the GEMV takes and one more (norm kernel,
    cuBLAS, SiLU kernel, add)."""
    from tuili.layers.backend import GEMV_MAX_ROWS as FUSED, TritonBackend
    from tuili.layers.linear import Linear
    from tuili.layers.norm import RMSNorm

    torch.manual_seed(0)
    backend = TritonBackend(torch.device("cuda"))
    norm = RMSNorm(1024, 1e-6, backend).cuda().to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    w = torch.randn(3000, 1024, device="cuda", dtype=torch.bfloat16) * 0.03
    layer = Linear(1024, 3000, weight=torch.nn.Parameter(w, requires_grad=False))
    x = torch.randn(FUSED + 1, 1024, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(FUSED + 1, 3000, device="cuda", dtype=torch.bfloat16)
    assert backend.fuses(x[:FUSED]) and not backend.fuses(x)
    fused = backend.linear(x[:FUSED], layer, norm=norm, residual=res[:FUSED])
    unfused = backend.linear(x, layer, norm=norm, residual=res)[:FUSED]
    torch.testing.assert_close(fused, unfused, atol=2e-2, rtol=1e-2)
    fused = backend.linear(x[:FUSED], layer, norm=norm, gated=True)
    unfused = backend.linear(x, layer, norm=norm, gated=True)[:FUSED]
    torch.testing.assert_close(fused, unfused, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("m", [1, 5, 8])
@pytest.mark.parametrize("config", [None, FMA, DOT, WHOLE], ids=["default", "fma", "dot", "whole"])
def test_sums_of_squares_chain(m, config):
    """A residual GEMV leaves its output's sums of squares in parts; the next GEMV's norm takes its
    scale from them and matches the reference norm of that output (and the in-kernel pass)."""
    torch.manual_seed(m)
    k, n = 1000, 1536
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    h, sumsq = triton_gemv.gemv(x, w1, residual=res, config=config, want_sumsq=True)
    assert sumsq.dtype == torch.float32 and sumsq.shape[0] == m
    torch.testing.assert_close(sumsq.sum(1), h.float().pow(2).sum(1), rtol=1e-5, atol=1e-3)
    w2 = torch.randn(2 * 700, n, device="cuda", dtype=torch.bfloat16) * n ** -0.5
    norm_w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    out = torch.full((m, 700), float("nan"), device="cuda", dtype=torch.bfloat16)
    triton_gemv.gemv(h, w2, norm_weight=norm_w, eps=1e-5, gated=True, config=config, out=out,
                     sumsq=sumsq)
    ref = expected(h, w2, None, None, norm_w, True)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)
    assert (out == ref).float().mean() > 0.9
    in_kernel = triton_gemv.gemv(h, w2, norm_weight=norm_w, eps=1e-5, gated=True, config=config
                                 or triton_gemv.default_config(m, 700, n, True, True))
    assert (out == in_kernel).float().mean() > 0.95


def test_layer_api_passes_sums_along():
    """backend.linear(want_sumsq=True) gives (out, sums) from the GEMV and (out, None) past its
    row limit."""
    from tuili.layers.backend import GEMV_MAX_ROWS as FUSED, TritonBackend
    from tuili.layers.linear import Linear

    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16) * 0.06
    layer = Linear(256, 512, weight=torch.nn.Parameter(w, requires_grad=False))
    x = torch.randn(FUSED + 1, 256, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(FUSED + 1, 512, device="cuda", dtype=torch.bfloat16)
    linear = TritonBackend(torch.device("cuda")).linear
    out, sumsq = linear(x[:2], layer, residual=res[:2], want_sumsq=True)
    torch.testing.assert_close(sumsq.sum(1), out.float().pow(2).sum(1), rtol=1e-5, atol=1e-3)
    out, sumsq = linear(x, layer, residual=res, want_sumsq=True)
    assert sumsq is None and out.shape == (FUSED + 1, 512)


@pytest.mark.parametrize("fusion", ["norm+gated", "bias+residual"])
@pytest.mark.parametrize("k", [2048, 4096], ids=["early-release", "late-release"])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_same_with_and_without_programmatic_launch(monkeypatch, fusion, k, m):
    """PDL changes when a launch starts, never what it computes: bit-equal outputs, also in a
    chain of dependent launches replayed from a CUDA graph (small weights release the next
    launch at their start, large ones after their weight loop)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper")
    torch.manual_seed(3)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(2 * k, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(6)]
    norm_w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    # where this GPU's rule gives the merged gate/up to cuBLAS, the H100's tiles stand in
    gated = triton_gemv.default_config(m, k, k, gated=True) or GemvConfig(2, 4096, 8)

    def chain():
        h = x
        for w in ws:
            if fusion == "norm+gated":
                sumsq = h.float().pow(2).sum(1, keepdim=True)  # as a producing GEMV leaves them
                h = triton_gemv.gemv(h, w, norm_weight=norm_w, eps=1e-5, gated=True, sumsq=sumsq,
                                     config=gated)
            else:
                h = triton_gemv.gemv(h, w[:k], residual=h)
        return h

    outs = {}
    for on in (True, False):
        monkeypatch.setattr(triton_gemv, "pdl", lambda t, on=on: on)
        eager = chain()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = chain()
        captured.fill_(float("nan"))
        g.replay()
        assert torch.equal(eager, captured)
        outs[on] = eager
    assert torch.equal(outs[True], outs[False])
