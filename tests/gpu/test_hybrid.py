"""granite-4.0-h on the GPU (bf16, Triton kernels) against HF transformers in float32 on the same
random weights of granite-4.0-h-micro's and -tiny's shapes (4 layers, one of them attention):
greedy tokens within HF's top-5 (tests/gpu/test_gpu_engine.py's rule), prompts past the 256-token
scan chunk, whole and chunked over steps, decode graphs and eager, prefix hits; the conv and SSD
kernels against the references at that shape."""

import pytest
import torch

from tuili import LLM
from tuili.kernels import reference_mamba

from .hybrid_models import build
from .test_gpu_engine import GREEDY, assert_within_hf_top5, prompts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module", params=["granite-4.0-h-micro", "granite-4.0-h-tiny"])
def granite(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder, num_layers=4, every=4).float()
    yield folder, hf
    del hf
    torch.cuda.empty_cache()


@pytest.mark.parametrize("engine_options", [{}, {"enforce_eager": True},
                                            {"max_num_batched_tokens": 64, "block_size": 32}])
def test_granite_greedy_within_hf_top5(granite, engine_options):
    folder, hf = granite
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
              **engine_options)
    assert llm.engine.model_config.mamba.layers == [0, 1, 3]
    assert llm.engine.runner.model.layers[0].mamba._kernels.__name__.endswith("triton_mamba")
    assert (llm.engine.runner.graphs is None) == bool(engine_options.get("enforce_eager"))
    ids = prompts(hf.config.vocab_size)  # up to 300 tokens: past a 256-token chunk
    assert_within_hf_top5(hf, ids[:1], llm.generate(ids[:1], GREEDY))
    assert_within_hf_top5(hf, ids, llm.generate(ids, GREEDY))
    assert_within_hf_top5(hf, ids, llm.generate(ids, GREEDY))  # prefix hits: snapshots restored
    assert llm.engine.pool.stats.hits > 0
    states = llm.engine.kv.states
    assert not states.owner and len(states.free) == states.num_slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_kernels_match_reference(dtype):
    from tuili.kernels import triton_mamba

    heads, p, groups, n, t = 64, 64, 1, 128, 700
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(t, heads * p + 2 * groups * n, generator=g, device="cuda").to(dtype)
    x, B, C = buf.split([heads * p, groups * n, groups * n], dim=1)
    x, B, C = x.view(t, heads, p), B.view(t, groups, n), C.view(t, groups, n)
    dt = torch.nn.functional.softplus(torch.randn(t, heads, generator=g, device="cuda") - 2)
    A = -torch.rand(heads, generator=g, device="cuda") * 4
    D = torch.randn(heads, generator=g, device="cuda")
    pool = torch.randn(6, heads, p, n, generator=g, device="cuda").to(dtype)
    # two decode rows, then prefills of 300 tokens from zero and 398 after 1000 cached
    prefills, slots = [(2, 300, 0), (302, 398, 1000)], [4, 1]
    ref_pool, ref_y = pool.clone(), torch.zeros(t, heads, p, device="cuda")
    reference_mamba.ssd_prefill(x, dt, A, B, C, D, 256, ref_pool, slots, prefills, ref_y)
    ref_y[:2] = reference_mamba.ssd_decode(x[:2], dt[:2], A, B[:2], C[:2], D, ref_pool,
                                           torch.tensor([0, 5], device="cuda"))
    y = torch.zeros_like(ref_y)
    seqs = torch.tensor(list(zip(*prefills)), dtype=torch.int32, device="cuda")
    triton_mamba.ssd_prefill(x, dt, A, B, C, D, 256, pool, torch.tensor(slots, device="cuda"),
                             seqs, y)
    y[:2] = triton_mamba.ssd_decode(x[:2], dt[:2], A, B[:2], C[:2], D, pool,
                                    torch.tensor([0, 5], device="cuda"))
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    scale = ref_y.abs().max()
    torch.testing.assert_close(y / scale, ref_y / scale, **tol)
    torch.testing.assert_close(pool.float(), ref_pool.float(), **tol)


def test_conv_kernels_match_reference():
    from tuili.kernels import triton_mamba

    channels, k, t = 4096 + 2 * 128, 4, 700
    g = torch.Generator(device="cuda").manual_seed(1)
    proj = torch.randn(t, channels + 4096 + 64, generator=g, device="cuda").to(torch.bfloat16)
    conv_x = proj[:, 4096:4096 + channels]
    weight = torch.randn(channels, k, generator=g, device="cuda").to(torch.bfloat16)
    bias = torch.randn(channels, generator=g, device="cuda").to(torch.bfloat16)
    pool = torch.randn(6, channels, k - 1, generator=g, device="cuda").to(torch.bfloat16)
    prefills, slots = [(2, 300, 0), (302, 398, 1000)], [4, 1]
    ref_pool, ref_out = pool.clone(), torch.zeros(t, channels, device="cuda", dtype=torch.bfloat16)
    reference_mamba.prefill_states(conv_x, weight, bias, ref_pool, slots, prefills, ref_out)
    decodes = torch.tensor([0, 5], device="cuda")
    ref_out[:2] = reference_mamba.decode_states(conv_x[:2], weight, bias, ref_pool, decodes)
    out = torch.zeros_like(ref_out)
    seqs = torch.tensor(list(zip(*prefills)), dtype=torch.int32, device="cuda")
    triton_mamba.prefill_states(conv_x, weight, bias, pool, torch.tensor(slots, device="cuda"),
                                seqs, out)
    out[:2] = triton_mamba.decode_states(conv_x[:2], weight, bias, pool, decodes)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(pool, ref_pool)
