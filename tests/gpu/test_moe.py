"""Mixture of experts on the GPU: the fused Triton kernel against the torch reference at
Qwen3-30B-A3B's and Mixtral-8x7B's expert shapes (decode to prefill sizes, and replayed in a CUDA
graph), and the engine on random weights of those shapes (2 layers) within HF's top-5 at every
greedy step."""

import gc

import pytest
import torch

from tuili import LLM

from .random_models import build
from .test_gpu_engine import GREEDY, assert_within_hf_top5, prompts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tuili.kernels import reference_moe, triton_moe  # noqa: E402

# hidden, expert intermediate, experts, top_k
EXPERT_SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral-8x7b": (4096, 14336, 8, 2)}


def random_experts(hidden, inter, experts):
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=g) * inter ** -0.5
    return w13.bfloat16(), w2.bfloat16()


@pytest.mark.parametrize("shape", list(EXPERT_SHAPES))
@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 4096])
def test_fused_moe_matches_reference(shape, tokens):
    hidden, inter, experts, top_k = EXPERT_SHAPES[shape]
    w13, w2 = random_experts(hidden, inter, experts)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = reference_moe.route(torch.randn(tokens, experts, device="cuda"), top_k, True)
    out = triton_moe.fused_moe(x, w13, w2, weights, ids)
    ref = reference_moe.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    # bf16 rounding of the intermediate and the output: relative to the output's scale
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2, err


def test_fused_moe_replays_in_a_cuda_graph():
    hidden, inter, experts, top_k = EXPERT_SHAPES["qwen3-30b-a3b"]
    w13, w2 = random_experts(hidden, inter, experts)
    x = torch.randn(4, hidden, device="cuda").bfloat16()
    logits = torch.randn(4, experts, device="cuda")

    def step():
        return triton_moe.fused_moe(x, w13, w2, *reference_moe.route(logits, top_k, True))

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):  # new inputs and new routing each replay
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        torch.testing.assert_close(out, step(), atol=0, rtol=0)


@pytest.fixture(autouse=True)
def free_engines():
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=list(EXPERT_SHAPES))
def shaped(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder, num_layers=2).float()
    yield request.param, folder, hf
    del hf
    torch.cuda.empty_cache()


@pytest.mark.parametrize("engine_options", [{}, {"enforce_eager": True}])
def test_greedy_within_hf_top5(shaped, engine_options):
    name, folder, hf = shaped
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
              **engine_options)
    assert llm.engine.model_config.moe is not None
    ids = prompts(hf.config.vocab_size)
    # bf16 rounding can flip a near-tied expert choice (top-2 of 8 in Mixtral), which moves a
    # logit further than dense rounding does: one such miss of 0.55 was seen on the H200
    assert_within_hf_top5(hf, ids[:1], llm.generate(ids[:1], GREEDY), near_tie=1.0)
    assert_within_hf_top5(hf, ids, llm.generate(ids, GREEDY), near_tie=1.0)
