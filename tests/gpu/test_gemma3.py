"""Gemma 3 on the GPU (bf16, Triton kernels, CUDA graphs) against HF transformers in float32 on
the same random weights of Gemma 3 1B's shape (window cut to 64): greedy tokens within HF's top-5
(tests/gpu/test_gpu_engine.py's rule), prompts past the window; the windowed kernels in bf16."""

import pytest
import torch

from tuili import LLM
from tuili.kernels import reference

from .random_models import build, random_cache, random_tables
from .test_gpu_engine import GREEDY, assert_within_hf_top5, prompts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    hf = build("gemma3-1b", folder, num_layers=4).float()
    yield folder, hf
    del hf
    torch.cuda.empty_cache()


@pytest.mark.parametrize("engine_options", [{}, {"enforce_eager": True},
                                            {"max_num_batched_tokens": 64, "block_size": 32}])
def test_gemma3_greedy_within_hf_top5(gemma, engine_options):
    folder, hf = gemma
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
              **engine_options)
    assert [a.window for a in llm.engine.runner.model.attention_layers()] == [64, 0, 64, 0]
    ids = prompts(hf.config.vocab_size)  # up to 300 tokens: past the window
    assert_within_hf_top5(hf, ids[:1], llm.generate(ids[:1], GREEDY))
    assert_within_hf_top5(hf, ids, llm.generate(ids, GREEDY))
    assert_within_hf_top5(hf, ids, llm.generate(ids, GREEDY))  # prefix-cache hits


@pytest.mark.parametrize("window", [1, 64, 1000])
def test_windowed_kernels_match_reference(window):
    from tuili.kernels import triton_attention

    heads, kvh, d, bs = 8, 1, 256, 16
    torch.manual_seed(window)
    lens = [1, 70, 900, 4100]
    caches = random_cache(600, bs, kvh, d)
    tables = random_tables(lens, bs, 600)
    seq_lens = torch.tensor(lens, device="cuda")
    q = torch.randn(len(lens), heads, d, device="cuda", dtype=torch.bfloat16)
    out = triton_attention.decode_attention(q, *caches, tables, seq_lens, d ** -0.5,
                                            max_len=max(lens), window=window)
    ref = reference.decode_attention(q.float(), caches[0].float(), caches[1].float(), tables,
                                     seq_lens, max(lens), d ** -0.5, window)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # prefill: 300 new tokens after 3800 cached ones
    new, cached = 300, 3800
    q = torch.randn(new, heads, d, device="cuda", dtype=torch.bfloat16)
    seqs = torch.tensor([[0], [new], [cached]], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    triton_attention.prefill_attention(q, *caches, tables[3:], seqs, new, d ** -0.5, out,
                                       window=window)
    keys = [reference.gather_kv(c.float(), tables[3], cached + new) for c in caches]
    ref = reference.prefill_attention(q.float(), keys[0][cached:], keys[1][cached:],
                                      caches[0].float(), caches[1].float(), tables[3], cached,
                                      d ** -0.5, window)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
