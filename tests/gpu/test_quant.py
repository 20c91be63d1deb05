"""The quantized linears compiled on the GPU: each kernel against its torch reference (the
default tiles on either card's traits, every tile the sweep times, split K in a CUDA graph), and a
random Qwen3-0.6B-shaped model quantized at load decoding through the kernels (eager and in CUDA
graphs) as it does through the reference path (dequantize, then matmul) on the same weights."""

import functools

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from benchmarks.quant_gemv_sweep import INT4_TILES, SCALED_TILES  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.kernels import reference_quant, triton_quant  # noqa: E402
from tuili.quantization.fp8 import FP8, FP8_MAX, quantize_per_row  # noqa: E402
from tuili.quantization.int4 import quantize_rtn  # noqa: E402
from tuili.quantization.packing import pack_rows  # noqa: E402


@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("m", [1, 3, 8, 20])
@pytest.mark.parametrize("n,k", [(40, 384), (4096, 4096), (1000, 3072)])
def test_int4_kernels_match_reference(m, n, k, group):
    torch.manual_seed(m + n)
    g = k if group == -1 else group
    scales, zeros, q = quantize_rtn(torch.randn(n, k), g)
    qw = pack_rows(q.t()).cuda()
    s, z = scales.t().contiguous().cuda(), zeros.t().contiguous().cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = triton_quant.int4_linear(x, qw, s.to(torch.bfloat16), z, g)
    ref = reference_quant.int4_linear(x.float(), qw, s, z, g)
    # bf16 weights and outputs against a float32 reference: a relative error, not per element
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_scaled_gemv_matches_reference(kind, m):
    torch.manual_seed(m)
    n, k = 1037, 2000
    w = torch.randn(n, k, device="cuda")
    q, scale = (quantize_per_row(w, torch.int8, 127) if kind == "int8"
                else quantize_per_row(w, FP8, FP8_MAX))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = triton_quant.scaled_gemv(x, q, scale)
    ref = reference_quant.scaled_linear(x.float(), q, scale)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@functools.cache
def _int4(n: int, k: int, group: int):
    """A random 4-bit weight (qweight, bf16 scales, zeros) on the GPU, made once per shape."""
    torch.manual_seed(n + k + group)
    scales, zeros, q = quantize_rtn(torch.randn(n, k, device="cuda"), group)
    return (pack_rows(q.t()).cuda(), scales.t().contiguous().cuda().to(torch.bfloat16),
            zeros.t().contiguous().cuda())


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # bf16 outputs against a float32 reference: a relative error, not per element
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("tile,split", [(t, 5) for t in INT4_TILES] + [(INT4_TILES[0], 1)],
                         ids=[f"{bn}x{bk}-{w}w{'-pf' if pf else ''}"
                              for bn, bk, w, pf in INT4_TILES] + ["unsplit"])
def test_int4_sweep_tiles(tile, split):
    """Each tile benchmarks/quant_gemv_sweep.py times (so that a measured winner is a correct
    one), split on a K range that no tile divides evenly into 5, and one unsplit."""
    bn, bk, w, pf = tile
    torch.manual_seed(bn + bk)
    n, k, group = 3008, 4224, 128  # multiples of 16, as the 8B shapes (one compiled kernel)
    qw, s, z = _int4(n, k, group)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cfg = triton_quant.QuantGemvConfig(bn, bk, split, num_warps=w, prefetch=pf)
    _close(triton_quant.int4_gemv(x, qw, s, z, group, None, cfg),
           reference_quant.int4_linear(x.float(), qw, s.float(), z, group))


@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("card", ["h100", "h200"])
def test_int4_default_tiles_on_8b_shapes(group, m, card, monkeypatch):
    """int4_config's tiles for either card's traits (TUILI_TUNE_AS) on Llama-3.1-8B's down
    projection (the longest reduction: the most splits), with a bias."""
    from tuili.kernels import tuning

    monkeypatch.setattr(triton_quant, "gpu_traits", lambda device=None: tuning.CARDS[card])
    torch.manual_seed(m)
    n, k = 4096, 14336
    g = k if group == -1 else group
    qw, s, z = _int4(n, k, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    _close(triton_quant.int4_gemv(x, qw, s, z, g, bias),
           reference_quant.int4_linear(x.float(), qw, s.float(), z, g, bias.float()))


def test_int4_split_in_a_cuda_graph():
    """The split ranges' tickets go back to 0 at each launch: replays of a captured split
    GEMV with new inputs each give the reference."""
    torch.manual_seed(0)
    n, k, group = 4096, 4096, 128
    qw, s, z = _int4(n, k, group)
    cfg = triton_quant.QuantGemvConfig(128, 128, 16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    triton_quant.int4_gemv(x, qw, s, z, group, None, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_quant.int4_gemv(x, qw, s, z, group, None, cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        _close(out, reference_quant.int4_linear(x.float(), qw, s.float(), z, group))


@pytest.mark.parametrize("kind,tile", [(kind, t) for kind in ("int8", "fp8") for t in SCALED_TILES]
                         + [("int8-converted", t) for t in SCALED_TILES[1:4]])
def test_scaled_sweep_tiles(kind, tile):
    """Each int8 / FP8 tile the sweep times (int8 by its bits, and on three tiles by the
    int-to-float conversion)."""
    bn, bk, w = tile
    torch.manual_seed(bn)
    n, k = 1040, 5008
    wt = torch.randn(n, k, device="cuda")
    q, scale = (quantize_per_row(wt, FP8, FP8_MAX) if kind == "fp8"
                else quantize_per_row(wt, torch.int8, 127))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cfg = triton_quant.QuantGemvConfig(bn, bk, num_warps=w, int8_bits=kind == "int8")
    _close(triton_quant.scaled_gemv(x, q, scale, None, cfg),
           reference_quant.scaled_linear(x.float(), q, scale))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-quant")
    hf = build("qwen3-0.6b", path, num_layers=4)
    del hf
    torch.cuda.empty_cache()
    return path


def _methods(llm):
    return [m.method for m in llm.engine.runner.model.modules() if hasattr(m, "method")
            and hasattr(m.method, "use_triton")]


@pytest.mark.parametrize("quantization", ["int8", "fp8", "int4"])
def test_quantized_model_decodes_through_the_kernels(folder, quantization):
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 130)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    eager = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=1,
                max_num_seqs=4, quantization=quantization, enforce_eager=True)
    methods = _methods(eager)
    assert methods and all(m.use_triton for m in methods)
    kernels = eager.generate(prompts, greedy)
    for m in methods:
        m.use_triton = False
    reference = eager.generate(prompts, greedy)
    del eager
    graphs = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=1,
                 max_num_seqs=4, quantization=quantization)
    in_graphs = graphs.generate(prompts, greedy)
    for ours, ref, graphed in zip(kernels, reference, in_graphs):
        a, b = ours.outputs[0].token_ids, ref.outputs[0].token_ids
        agree = sum(x == y for x, y in zip(a, b)) / len(a)
        assert agree >= 0.75, (a, b)  # bf16 summation order only: near-ties may flip
        assert graphed.outputs[0].token_ids == a
