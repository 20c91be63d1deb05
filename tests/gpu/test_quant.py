"""The quantized linears compiled on the GPU: each kernel against its torch reference (the
default tiles on either card's traits, every tile the sweep times, split K in a CUDA graph), and a
random Qwen3-0.6B-shaped model quantized at load decoding through the kernels (eager and in CUDA
graphs) as it does through the reference path (dequantize, then matmul) on the same weights.
The decode GEMVs' fusions (norm, SiLU, residual add, sums of squares) against the reference chain
and the unfused kernels, the backend's route into them, and a random Llama-3.1-8B-shaped model's
greedy decode with and without them (int4, FP8)."""

import functools

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from benchmarks.quant_gemv_sweep import INT4_TILES, SCALED_TILES  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tests.quant_fusions import (EPS, act_order_weight, int4_reference, int4_weight,  # noqa: E402
                                 parts_of_squares, scaled_weight, unfused)
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


# The decode GEMVs' fusions (the bf16 GEMV's: RMSNorm prologue, silu(gate) * up, residual add,
# the output's sums of squares for the next norm), compiled, in bf16.

FUSION_SHAPES = [(37, 384), (1000, 3072), (4096, 4096)]  # (outputs, K): padded tiles, odd sizes
FUSIONS = ["norm+gated", "sumsq-norm+gated", "bias+residual+sums", "norm+residual"]


def _fused_kwargs(fusion, x, n):
    kw = {}
    if "norm" in fusion:
        kw.update(norm_weight=torch.rand(x.shape[1], device="cuda", dtype=torch.bfloat16) + 0.5,
                  eps=EPS)
    if "sumsq" in fusion:
        kw["sumsq"] = parts_of_squares(x, 5)
    if "gated" in fusion:
        kw["gated"] = True
    if "residual" in fusion:
        kw["residual"] = torch.randn(x.shape[0], n, device="cuda", dtype=torch.bfloat16)
    if "sums" in fusion:
        kw["want_sumsq"] = True
    return kw


def _check_fused(fused, x, kw, linear, kernel_alone):
    """The fused GEMV against the reference chain in bf16 (dequantize -> cuBLAS), and against
    the same kernel unfused with the reference norm, SiLU and add around it: one summation
    order, so equal but where the norm's float32 sum of squares rounds a value the other way."""
    out = fused[0] if kw.get("want_sumsq") else fused
    args = (x, linear, kw.get("norm_weight"), kw.get("gated", False), kw.get("residual"))
    _close(out, unfused(*args).float())
    apart = unfused(x, kernel_alone, *args[2:])
    assert (out == apart).float().mean() > 0.95
    if kw.get("want_sumsq"):
        torch.testing.assert_close(fused[1].sum(1), out.float().pow(2).sum(1), rtol=1e-4,
                                   atol=1e-2)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("group", [32, 128, -1, "act-order"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", FUSION_SHAPES)
def test_int4_fusions_match_reference(n, k, m, group, fusion):
    torch.manual_seed(m + n + k)
    rows = 2 * n if "gated" in fusion else n
    qw, s, z, g, perm = (act_order_weight(rows, k - 24, 8, "cuda", torch.float16)
                         if group == "act-order" else
                         int4_weight(rows, k, k if group == -1 else group, "cuda", torch.float16))
    x = torch.randn(m, k - 24 if perm is not None else k, device="cuda", dtype=torch.bfloat16)
    kw = _fused_kwargs(fusion, x, n)
    bias = (torch.randn(rows, device="cuda", dtype=torch.bfloat16) if "bias" in fusion
            else None)
    linear = int4_reference(qw, s, z, g, perm)
    plain = (lambda h: linear(h) + bias) if bias is not None else linear
    fused = triton_quant.int4_gemv(x, qw, s, z, g, bias, perm=perm, **kw)
    _check_fused(fused, x, kw, plain,
                 lambda h: triton_quant.int4_gemv(h, qw, s, z, g, bias, perm=perm))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", FUSION_SHAPES)
def test_scaled_fusions_match_reference(n, k, m, kind, fusion):
    torch.manual_seed(m + n + k)
    rows = 2 * n if "gated" in fusion else n
    q, scale = scaled_weight(kind, rows, k, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kw = _fused_kwargs(fusion, x, n)
    bias = (torch.randn(rows, device="cuda", dtype=torch.bfloat16) if "bias" in fusion
            else None)
    fused = triton_quant.scaled_gemv(x, q, scale, bias, **kw)
    _check_fused(fused, x, kw, lambda h: reference_quant.scaled_linear(h, q, scale, bias),
                 lambda h: triton_quant.scaled_gemv(h, q, scale, bias))


def test_int4_fused_split_in_a_cuda_graph():
    """A split GEMV's last-arriving range runs the epilogue (norm from the sums, SiLU; then the
    residual add leaving the sums) in each replay of a captured pair."""
    torch.manual_seed(0)
    d, inter, group = 4096, 2048, 128
    gate_up = _int4(2 * inter, d, group)
    down = _int4(d, inter, group)
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    sumsq = parts_of_squares(x)

    def pair():
        h = triton_quant.int4_gemv(x, *gate_up, group, norm_weight=norm_w, eps=EPS, gated=True,
                                   sumsq=sumsq)
        return triton_quant.int4_gemv(h, *down, group, residual=x, want_sumsq=True)

    assert triton_quant.int4_config(1, 2 * inter, d, group).split_k > 1
    pair()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, sums = pair()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        sumsq.copy_(parts_of_squares(x))
        graph.replay()
        h = unfused(x, lambda v: reference_quant.int4_linear(v, gate_up[0], *gate_up[1:], group),
                    norm_w, gated=True)
        ref = reference_quant.int4_linear(h, down[0], *down[1:], group) + x
        _close(out, ref.float())
        torch.testing.assert_close(sums.sum(1), out.float().pow(2).sum(1), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("m", [1, 8])
def test_fused_gemvs_same_with_and_without_programmatic_launch(m, monkeypatch):
    """The fusions read x, the sums and the residual after gdc_wait: with programmatic dependent
    launch behind a producer of them (the first GEMV), the same bits as without."""
    torch.manual_seed(m)
    d, n = 4096, 1536
    qw, s, z = _int4(2 * n, d, 128)
    q8, s8 = scaled_weight("int8", d, 2 * n, "cuda")
    x = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    stream = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)

    def chain():
        h, sums = triton_quant.scaled_gemv(x, q8, s8, residual=stream, want_sumsq=True)
        return triton_quant.int4_gemv(h, qw, s, z, 128, norm_weight=norm_w, eps=EPS,
                                      gated=True, sumsq=sums)

    with_pdl = chain()
    monkeypatch.setattr(triton_quant, "pdl", lambda t: False)
    assert torch.equal(chain(), with_pdl)


@pytest.mark.parametrize("quantization", ["int4", "int8", "fp8"])
def test_backend_routes_quantized_layers_into_fused_gemvs(quantization, monkeypatch):
    """TritonBackend.linear: a quantized layer at <= 8 rows takes its format's fused GEMV with
    the norm, SiLU and add (one launch, and the sums of squares), equal to the same calls with
    the fusions off (norm kernel, the plain GEMV, SiLU kernel, add) and to 9 rows (no GEMV)."""
    import tuili.layers.backend as backend
    from tuili.layers.linear import Linear
    from tuili.layers.norm import RMSNorm
    from tuili.quantization import method_class
    from tuili.quantization.config import QuantConfig

    torch.manual_seed(0)
    k, inter = 1024, 1536
    tb = backend.TritonBackend(torch.device("cuda"))
    norm = RMSNorm(k, EPS, tb).cuda().to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    layers = []
    for sizes, k_in in (([inter, inter], k), ([k], inter)):
        layer = Linear(k_in, sizes).cuda().to(torch.bfloat16)
        layer.weight.data.normal_(0, k_in ** -0.5)
        layer.params_dtype, layer.params_device = torch.bfloat16, layer.weight.device
        qc = QuantConfig(quantization, group_size=128 if quantization == "int4" else -1)
        layer.method = method_class(qc)(qc, layer)
        layer.method.use_triton = True
        layer.method.create_weights(layer)
        layer.process_weights_after_loading()
        layers.append(layer)
    gate_up, down = layers
    x = torch.randn(9, k, device="cuda", dtype=torch.bfloat16)

    def mlp(rows):
        h = tb.linear(x[:rows], gate_up, norm=norm, gated=True)
        return tb.linear(h, down, residual=x[:rows], want_sumsq=True)

    fused, sums = mlp(8)
    assert sums is not None
    torch.testing.assert_close(sums.sum(1), fused.float().pow(2).sum(1), rtol=1e-4, atol=1e-2)
    wide, none = mlp(9)
    assert none is None
    monkeypatch.setattr(backend, "QUANT_FUSIONS", False)
    apart, none = mlp(8)
    assert none is None
    assert (fused == apart).float().mean() > 0.95
    _close(fused, wide[:8].float())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A random Llama-3.1-8B-shaped model of 2 layers (every real projection shape and tile; the
    branches scaled down so that a bf16 rounding rarely flips a greedy token)."""
    path = tmp_path_factory.mktemp("llama3-quant")
    hf = build("llama3-8b", path, num_layers=2, branch_scale=0.5)
    del hf
    torch.cuda.empty_cache()
    return path


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_llama_decodes_the_same_with_the_fusions(llama_folder, quantization,
                                                           monkeypatch):
    """The whole model: decode steps of 1..8 rows through the fused quantized GEMVs (eager and in
    CUDA graphs) give the greedy tokens and logprobs of the unfused path (the plain GEMV with the
    norm, SiLU and add kernels apart: QUANT_FUSIONS off), on the same quantized weights; and the
    fused GEMVs did run (norm, SiLU and residual in them)."""
    import gc

    import tuili.layers.backend as backend

    prompts = [list(range(5 + i, 5 + i + n)) for i, n in enumerate((3, 17, 40, 9, 130, 5, 66, 12))]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    options = dict(dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
                   max_model_len=512, quantization=quantization)
    kernel = "int4_gemv" if quantization == "int4" else "scaled_gemv"
    seen = set()
    gemv = getattr(triton_quant, kernel)

    def recording(*args, **kw):
        seen.update(f for f in ("norm_weight", "sumsq", "gated", "residual", "want_sumsq")
                    if kw.get(f) is not None and kw.get(f) is not False)
        return gemv(*args, **kw)

    monkeypatch.setattr(triton_quant, kernel, recording)
    eager = LLM(str(llama_folder), enforce_eager=True, **options)
    fused = eager.generate(prompts, greedy)
    assert seen == {"norm_weight", "sumsq", "gated", "residual", "want_sumsq"}
    monkeypatch.setattr(backend, "QUANT_FUSIONS", False)
    apart = eager.generate(prompts, greedy)
    monkeypatch.setattr(backend, "QUANT_FUSIONS", True)
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    graphs = LLM(str(llama_folder), **options)
    in_graphs = graphs.generate(prompts, greedy)
    del graphs
    gc.collect()
    torch.cuda.empty_cache()
    for other in (apart, in_graphs):
        assert _agreement(fused, other) >= 0.9  # a rounding may flip a near tie, then diverge


def _agreement(outs, others) -> float:
    """The share of greedy tokens two runs agree on before they first differ; up to there each
    token's logprob within 0.05 (a bf16 rounding of the logits or the stream, not a bug)."""
    agree = total = 0
    for ours, ref in zip(outs, others):
        a, b = ours.outputs[0], ref.outputs[0]
        same = 0
        while same < len(a.token_ids) and a.token_ids[same] == b.token_ids[same]:
            same += 1
        agree, total = agree + same, total + len(a.token_ids)
        for lp, lp_ref in zip(a.logprobs[:same], b.logprobs[:same]):
            assert abs(lp.logprob - lp_ref.logprob) < 0.05, (lp, lp_ref)
    return agree / total
