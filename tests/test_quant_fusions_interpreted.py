"""The quantized decode GEMVs' fusions (kernels/triton_quant.py: the bf16 GEMV's RMSNorm prologue,
silu(gate) * up, residual add and output sums of squares) on the CPU under Triton's interpreter,
against reference ops (norm, dequantize -> matmul, silu_and_mul, add): int4 with groups of 32, 128,
per channel and act-order's gathered runs, split K, int8 and FP8, odd shapes, 1..8 rows in the FMA
and tensor-core forms. Skipped where Triton is not installed or a GPU is (tests/gpu runs them)."""

import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter

use_interpreter("tuili.kernels.triton_quant")
pytestmark = IGNORE_SCALAR_READS

from tests.quant_fusions import (EPS, act_order_weight, int4_reference,  # noqa: E402
                                 int4_weight, parts_of_squares, scaled_weight, unfused)
from tuili.kernels import reference_quant, triton_quant  # noqa: E402

C = triton_quant.QuantGemvConfig


# (out columns, k, group, config): a split K (its last-arriving range runs the epilogue), groups
# of 32 and 128, one group per channel (prefetch), act-order's padded runs in x's gathered order.
INT4_CASES = {
    "g32-split3": (20, 192, 32, C(32, 32, split_k=3)),
    "g128-split2": (36, 256, 128, C(16, 128, split_k=2)),
    "per-channel-prefetch": (12, 200, -1, C(16, 64, split_k=2, prefetch=True)),
    "act-order": (20, 90, "act", C(32, 32, split_k=2)),
}
FORMS = [(1, False), (3, False), (8, True)]  # one row (FMA), rows (FMA), the tensor-core form


def _int4(case, gated):
    n, k, group, cfg = INT4_CASES[case]
    rows = 2 * n if gated else n
    if group == "act":
        return act_order_weight(rows, k, 4), k, n, cfg
    return int4_weight(rows, k, k if group == -1 else group), k, n, cfg


@pytest.mark.parametrize("case,m,dot", [(case, m, dot) for case in INT4_CASES for m, dot in FORMS
                                        if m != 3 or case in ("g32-split3", "act-order")])
def test_int4_gemv_fusions(case, m, dot):
    """Norm (from a pass over x, then from the producer's parts) with the gated epilogue; the
    residual epilogue with the output's sums of squares."""
    torch.manual_seed(m)
    (qweight, scales, zeros, group, perm), k, n, cfg = _int4(case, gated=True)
    if dot:
        cfg = C(cfg.block_n, cfg.block_k, cfg.split_k, use_dot=True)
    x, norm_w = torch.randn(m, k), torch.rand(k) + 0.5
    linear = int4_reference(qweight, scales, zeros, group, perm)
    ref = unfused(x, linear, norm_w, gated=True)
    for sumsq in (None, parts_of_squares(x)):
        out = triton_quant.int4_gemv(x, qweight, scales, zeros, group, None, cfg, perm=perm,
                                     norm_weight=norm_w, eps=EPS, gated=True, sumsq=sumsq)
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    (qweight, scales, zeros, group, perm), k, n, _ = _int4(case, gated=False)
    x, residual, bias = torch.randn(m, k), torch.randn(m, n), torch.randn(n)
    linear = int4_reference(qweight, scales, zeros, group, perm)
    ref = unfused(x, lambda h: linear(h) + bias, residual=residual)
    out, sumsq = triton_quant.int4_gemv(x, qweight, scales, zeros, group, bias, cfg, perm=perm,
                                        residual=residual, want_sumsq=True)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    assert sumsq.shape == (m, -(-n // cfg.block_n))
    torch.testing.assert_close(sumsq.sum(1), out.pow(2).sum(1), atol=1e-3, rtol=1e-4)
    if cfg.split_k > 1:  # the tickets went back to 0: a second launch runs the epilogue again
        again = triton_quant.int4_gemv(x, qweight, scales, zeros, group, bias, cfg, perm=perm,
                                       residual=residual)
        torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,cfg", [(1, C(32, 64, split_k=2)), (8, C(32, 128, use_dot=True))],
                         ids=["one-row", "dot-a-nibble"])
def test_int4_fusions_round_as_the_reference_ops_in_16_bits(m, cfg):
    """float16 (the interpreter rounds it to nearest, as the GPU does; its bfloat16 truncates):
    the fused norm, SiLU and add round where the reference ops do, so the fused GEMV equals the
    plain one with those ops around it but where a float32 sum rounds the other way. The tile of
    a nibble's dots (128-long, one group) unpacks whole in float16, whose range (q - zero) * 16^4
    would overflow."""
    torch.manual_seed(m)
    n, k, dt = 40, 256, torch.float16
    qweight, scales, zeros, group, _ = int4_weight(2 * n, k, 128, dtype=dt)
    x, norm_w = torch.randn(m, k, dtype=dt), (torch.rand(k) + 0.5).to(dt)
    residual = torch.randn(m, n, dtype=dt)
    fused = triton_quant.int4_gemv(x, qweight, scales, zeros, group, None, cfg,
                                   norm_weight=norm_w, eps=EPS, gated=True, residual=residual)
    apart = unfused(x, lambda h: triton_quant.int4_gemv(h, qweight, scales, zeros, group, None,
                                                        cfg), norm_w, True, residual)
    assert not fused.isnan().any() and (fused == apart).float().mean() > 0.95
    ref = unfused(x, lambda h: reference_quant.int4_linear(h, qweight, scales, zeros, group),
                  norm_w, True, residual)
    torch.testing.assert_close(fused, ref, atol=0.5, rtol=2e-2)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m,cfg", [(1, C(4, 64)), (3, C(2, 256, num_warps=8)),
                                   (5, C(16, 64, use_dot=True)), (8, None)],
                         ids=["one-row", "rows-one-tile", "dot", "default"])
def test_scaled_gemv_fusions(kind, m, cfg):
    torch.manual_seed(m)
    n, k = 37, 200  # 37 outputs: the last tile padded; K = 200: not a multiple of the tile
    q, scale = scaled_weight(kind, 2 * n, k)
    x, norm_w, bias = torch.randn(m, k), torch.rand(k) + 0.5, torch.randn(2 * n)
    ref = unfused(x, lambda h: reference_quant.scaled_linear(h, q, scale, bias), norm_w,
                  gated=True)
    for sumsq in (None, parts_of_squares(x, 5)):
        out = triton_quant.scaled_gemv(x, q, scale, bias, cfg, norm_weight=norm_w, eps=EPS,
                                       gated=True, sumsq=sumsq)
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    q, scale = scaled_weight(kind, n, k)
    residual = torch.randn(m, n)
    ref = unfused(x, lambda h: reference_quant.scaled_linear(h, q, scale), norm_w,
                  residual=residual)
    out, sumsq = triton_quant.scaled_gemv(x, q, scale, None, cfg, norm_weight=norm_w, eps=EPS,
                                          residual=residual, want_sumsq=True)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(sumsq.sum(1), out.pow(2).sum(1), atol=1e-3, rtol=1e-4)


def test_sums_of_squares_chain_across_formats():
    """An int8 o_proj's residual epilogue leaves its sums; a 4-bit gate_up's norm takes them, and
    its own sums feed an FP8 GEMV's norm: each equals the reference chain."""
    torch.manual_seed(0)
    m, d, inter = 2, 96, 40
    x, stream = torch.randn(m, 64), torch.randn(m, d)
    q8, s8 = scaled_weight("int8", d, 64)
    h, sumsq = triton_quant.scaled_gemv(x, q8, s8, residual=stream, want_sumsq=True)
    qweight, scales, zeros, group, _ = int4_weight(2 * inter, d, 32)
    norm_w = torch.rand(d) + 0.5
    out = triton_quant.int4_gemv(h, qweight, scales, zeros, group, None, C(16, 32, split_k=3),
                                 norm_weight=norm_w, eps=EPS, gated=True, sumsq=sumsq)
    h_ref = reference_quant.scaled_linear(x, q8, s8) + stream
    torch.testing.assert_close(
        out, unfused(h_ref, lambda v: reference_quant.int4_linear(v, qweight, scales, zeros, 32),
                     norm_w, gated=True), atol=1e-3, rtol=1e-4)
    qweight, scales, zeros, group, _ = int4_weight(d, d, 32)
    h2, sumsq2 = triton_quant.int4_gemv(h, qweight, scales, zeros, group, None,
                                        C(32, 32, split_k=2), residual=h, want_sumsq=True)
    qf, sf = scaled_weight("fp8", 24, d)
    out = triton_quant.scaled_gemv(h2, qf, sf, None, C(4, 64), norm_weight=norm_w, eps=EPS,
                                   sumsq=sumsq2)
    torch.testing.assert_close(out, unfused(h2, lambda v: reference_quant.scaled_linear(v, qf, sf),
                                            norm_w), atol=1e-3, rtol=1e-4)


def test_fusions_reject_bad_arguments():
    qweight, scales, zeros, group, _ = int4_weight(16, 64, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="residual"):
        triton_quant.int4_gemv(x, qweight, scales, zeros, group, residual=torch.randn(2, 8))
    with pytest.raises(ValueError, match="norm weight"):
        triton_quant.int4_gemv(x, qweight, scales, zeros, group, norm_weight=torch.ones(32))
    with pytest.raises(ValueError, match="block_n >= 2"):
        triton_quant.scaled_gemv(x, torch.zeros(16, 64, dtype=torch.int8), torch.ones(16),
                                 config=C(1, 64), gated=True)


@pytest.mark.parametrize("quantization,reduces", [("int4", False), ("fp8", True)],
                         ids=["int4", "fp8-row-parallel-route"])
def test_quantized_decode_step_fuses_like_bf16(quantization, reduces, monkeypatch):
    """A quantized Llama's mixed step of 5 rows through the Triton backend matches the torch
    path (dequantize -> matmul, each norm, SiLU and add its own op), and launches what a bf16
    one does: each quantized projection one fused GEMV (norms, SiLU and the residual adds in
    them), no norm or SiLU kernel. reduces: o_proj and down_proj take the row-parallel route
    (the residual added after the all-reduce, here of one rank)."""
    import tuili.layers.backend as backend
    from tuili.layers.linear import Linear
    from tuili.layers.rotary import RotaryEmbedding
    from tuili.models.config import ModelConfig
    from tuili.quantization import prepare
    from tuili.quantization.config import QuantConfig
    from tests.attention_steps import mixed_step_meta, random_llamas

    torch.manual_seed(0)
    c = ModelConfig("LlamaForCausalLM", vocab_size=128, hidden_size=128, intermediate_size=96,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64)
    model, gpu_model = random_llamas(c)
    qc = QuantConfig(quantization, group_size=64 if quantization == "int4" else -1)
    for net in (model, gpu_model):
        quantized = prepare(net, qc)
        for layer in net.modules():
            if isinstance(layer, Linear):
                layer.process_weights_after_loading()
    assert len(quantized) == 4 * c.num_layers  # qkv, o, gate_up, down
    for name, layer in gpu_model.named_modules():
        if name in quantized:
            layer.method.use_triton = True
            layer.reduces = reduces and name.endswith(("o_proj", "down_proj"))
    rope = RotaryEmbedding(64, 64, 1e4, None, torch.float32, torch.device("cpu"))
    start = [torch.randn(8, 4, 1, 64) for _ in range(2)]
    meta = mixed_step_meta(rope)

    def step(net):
        for attn in net.attention_layers():
            attn.k_cache, attn.v_cache = (t.clone() for t in start)
        with torch.inference_mode():
            return net.logits(net(torch.tensor([7, 100, 3, 50, 121]), meta))

    expected = step(model)
    gemvs, apart = [], []
    kernel = "int4_gemv" if quantization == "int4" else "scaled_gemv"
    gemv = getattr(triton_quant, kernel)
    fusions = ("norm_weight", "sumsq", "gated", "residual", "want_sumsq")
    monkeypatch.setattr(triton_quant, kernel, lambda *a, **k: gemvs.append(
        [f for f in fusions if k.get(f) is not None and k.get(f) is not False]) or gemv(*a, **k))
    for name in ("rms_norm", "silu_and_mul"):
        monkeypatch.setattr(gpu_model.backend._fused, name,
                            lambda *a, _f=getattr(gpu_model.backend._fused, name), **k:
                            apart.append(_f.__name__) or _f(*a, **k))
    monkeypatch.setattr(backend, "GEMV_DTYPES", (torch.float32,))  # the interpreter's dtype
    torch.testing.assert_close(step(gpu_model), expected, atol=1e-4, rtol=1e-4)
    assert not apart  # every norm and SiLU rode in a GEMV
    add = [] if reduces else ["residual", "want_sumsq"]
    normed = ["norm_weight"] if reduces else ["norm_weight", "sumsq"]  # the sums the add left
    assert gemvs == [["norm_weight"], add, normed + ["gated"], add] + [
        normed, add, normed + ["gated"], add] * (c.num_layers - 1)
    if not reduces:
        return
    monkeypatch.setattr(backend, "QUANT_FUSIONS", False)  # each fusion its own op again
    gemvs.clear()
    torch.testing.assert_close(step(gpu_model), expected, atol=1e-4, rtol=1e-4)
    assert gemvs == [[]] * 4 * c.num_layers and apart
