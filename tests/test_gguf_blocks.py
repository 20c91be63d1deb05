"""GGUF blocks kept packed (quantization/gguf.py): the planes decode as the gguf package's own
dequantizer does, and a random llama GGUF of mixed block types (merged layers whose parts differ
in type, a type without a kernel) runs through GgufMethod's reference path on CPU exactly as
its dequantized float weights do."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from tests.gguf_models import random_blocks, write_llama_gguf
from tuili import LLM, InvalidParameter, SamplingParams
from tuili.analysis import ops
from tuili.kernels.reference_gguf import TYPES, bits_per_weight, dequantize as planes_dequantize
from tuili.kernels.reference_gguf import planes_from_blocks
from tuili.quantization.gguf import GgufMethod

# q/k Q4_K, v Q6_K: two segments in qkv; gate Q4_0 / up Q4_1: two in gate_up; layer 1's v in
# Q5_0 (no kernel: a float segment) and its up in Q8_0.
MIXED = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q8_0",
         "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q5_K", "1.attn_v": "Q5_0",
         "1.ffn_up": "Q8_0"}


@pytest.mark.parametrize("qtype", TYPES)
def test_planes_dequantize_as_gguf_does(qtype):
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 7, 512, rng)
    ref = torch.from_numpy(dequantize(raw, Q[qtype])).reshape(7, 512)
    planes = planes_from_blocks(torch.from_numpy(raw), qtype, 512)
    assert torch.equal(planes_dequantize(planes), ref)
    assert planes.nbytes == raw.size  # the same bytes, de-interleaved
    assert ops.WEIGHT_BITS[qtype.lower()] == bits_per_weight(qtype) == 8 * raw.size / (7 * 512)


def test_planes_reject_a_misshapen_tensor():
    raw = torch.zeros(4, 143, dtype=torch.uint8)
    with pytest.raises(ValueError, match="Q4_K rows of 256 values are 144 bytes"):
        planes_from_blocks(raw, "Q4_K", 256)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", hidden=256,
                            intermediate=512, layers=2, heads=4, kv_heads=2, types=MIXED)


def test_mixed_blocks_run_as_their_dequantized_weights(mixed_gguf):
    prompts = [[5, 6, 7], list(range(20, 61))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    packed = LLM(str(mixed_gguf), dtype="float32", quantization="gguf", kv_cache_memory_gb=0.05)
    layers = packed.engine.runner.model.layers
    qkv, mlp = layers[0].self_attn.qkv_proj.method, layers[0].mlp.gate_up_proj.method
    assert isinstance(qkv, GgufMethod) and not qkv.use_triton
    assert [s.planes.qtype for s in qkv.segments] == ["Q4_K", "Q6_K"]
    assert [s.planes.qtype for s in mlp.segments] == ["Q4_0", "Q4_1"]
    v1 = layers[1].self_attn.qkv_proj.method.segments
    assert v1[0].planes.qtype == "Q4_K" and v1[1].planes is None  # Q5_0: dequantized
    ours = packed.generate(prompts, params)
    floats = LLM(str(mixed_gguf), dtype="float32", quantization="none", kv_cache_memory_gb=0.05)
    ref = floats.generate(prompts, params)
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]
            assert [p for _, p in la.top] == pytest.approx([p for _, p in lb.top], abs=1e-4)


def test_gguf_needs_a_file_of_its_types(tmp_path):
    floats = write_llama_gguf(tmp_path / "f32.gguf", hidden=64, intermediate=128, layers=1,
                              heads=2, kv_heads=1, types={n: "F32" for n in MIXED})
    with pytest.raises(InvalidParameter, match="hold none of the types it reads .Q8_0"):
        LLM(str(floats), quantization="gguf")


def test_analysis_counts_gguf_bytes():
    """q4_k layers read 4.5 bits a weight; a file's mix reads its mean ("gguf-<bits>")."""
    from tuili.analysis.shapes import model_config

    config, _ = model_config("llama-3.1-8b", None)
    layers = ops.num_params(config)["layers"]
    bf16 = ops.weight_bytes(config, ops.Precision.for_dtype("bf16"))
    q4k = ops.weight_bytes(config, ops.Precision.for_dtype("q4_k"))
    assert bf16 - q4k == pytest.approx(layers * (16 - 4.5) / 8)
    mixed = ops.Precision("gguf-4.5", "bf16", "bf16", "bf16")
    assert ops.step_ops(config, [(1, 100)], 1, mixed) == ops.step_ops(
        config, [(1, 100)], 1, ops.Precision.for_dtype("q4_k"))
    with pytest.raises(Exception, match="must be one of"):
        ops.weight_bytes_per_param("gguf-x")
