"""The engine on the GPU (bf16) against HF transformers on the same random weights: at every greedy
step, tuili's token is in HF's top-5, or HF's token is in tuili's, or tuili's token is within
NEAR_TIE of HF's best logit; single and batched, with prefix hits, chunked prefill, with and
without CUDA graphs.

The reference runs in float32 on the bf16 weights: HF's own bf16 run strays further from float32
than tuili does (its logits differ from float32 by up to ~1.3 on the Llama-3 shape), so it would
be a noisy yardstick."""

import gc

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.engine.cuda_graphs import PrefillGraphs

from .random_models import build

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

# A token whose HF logit is within this of HF's best counts as a tie: random weights give flat
# distributions (the Llama-3 shape's top-8 often span < 0.3), and bf16 moves logits by up to ~1.3.
NEAR_TIE = 0.5
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)


@pytest.fixture(autouse=True)
def free_engines():
    """Each test's engine (an 8B-shaped model's weights, its KV cache and graphs) goes before the
    next test builds one."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=["llama3-8b", "qwen3-0.6b"])
def shaped(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder).float()  # the saved bf16 weights, computed in float32
    yield request.param, folder, hf
    del hf
    torch.cuda.empty_cache()


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 17, 64, 129, 300)]


@torch.inference_mode()
def assert_within_hf_top5(hf, prompt_ids, outs, near_tie: float = NEAR_TIE):
    for ids, out in zip(prompt_ids, outs):
        gen = out.outputs[0].token_ids
        logits = hf(input_ids=torch.tensor([ids + gen], device="cuda")).logits[0, len(ids) - 1:-1]
        hf_top5 = logits.float().topk(5).indices.tolist()
        ours_top5 = [[t for t, _ in lp.top] for lp in out.outputs[0].logprobs]
        gaps = (logits.max(-1).values - logits.gather(-1, torch.tensor(gen, device="cuda")[:, None])[:, 0]).tolist()
        misses = [i for i, t in enumerate(gen) if t not in hf_top5[i]
                  and hf_top5[i][0] not in ours_top5[i] and gaps[i] > near_tie]
        detail = [(i, gen[i], int((logits[i] > logits[i, gen[i]]).sum()) + 1, round(gaps[i], 3),
                   hf_top5[i], ours_top5[i]) for i in misses]
        assert not misses, f"(position, token, its HF rank, its HF logit gap, HF top-5, ours): {detail}"


@pytest.mark.parametrize("engine_options", [{}, {"enforce_eager": True},
                                            {"max_num_batched_tokens": 64, "block_size": 32}])
def test_greedy_within_hf_top5(shaped, engine_options, monkeypatch):
    name, folder, hf = shaped
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
              **engine_options)
    eager = engine_options.get("enforce_eager", False)
    assert (llm.engine.runner.graphs is None) == eager
    assert (llm.engine.runner.prefill_graphs is None) == eager
    replayed = []  # (token count, sequences) of each step that replayed a prefill graph
    real_run = PrefillGraphs.run

    def run(self, ids, positions, slots, seqs, *rest):
        replayed.append((len(ids), seqs))
        return real_run(self, ids, positions, slots, seqs, *rest)

    monkeypatch.setattr(PrefillGraphs, "run", run)
    ids = prompts(hf.config.vocab_size)
    assert_within_hf_top5(hf, ids[:1], llm.generate(ids[:1], GREEDY))
    batched = llm.generate(ids, GREEDY)
    assert_within_hf_top5(hf, ids, batched)
    again = llm.generate(ids, GREEDY)  # every prompt now hits the prefix cache
    assert all(o.num_cached_tokens > 0 for o, p in zip(again, ids) if len(p) > 32)
    assert_within_hf_top5(hf, ids, again)
    # Single and batched prompts, prefix hits and (with 64-token steps) chunks all replayed graphs.
    assert bool(replayed) != eager and all(n <= llm.engine.prefill_graph_tokens for n, _ in replayed)
    if "max_num_batched_tokens" in engine_options:  # chunks beside decodes: mixed steps replayed
        assert any(any(new == 1 and cached > 0 for _, new, cached in seqs)
                   and any(new > 1 for _, new, _ in seqs) for _, seqs in replayed)


@pytest.mark.parametrize("eager", [True, False])
def test_kv_cache_sized_from_gpu_memory(shaped, eager):
    """Weights, the profiled step's activations, the KV cache and (not eager) the CUDA graphs'
    memory pool all fit in the share asked for."""
    name, folder, hf = shaped
    gc.collect()  # engines of earlier tests hold memory until collected
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.6,
              max_num_seqs=4, enforce_eager=eager)
    pool = llm.engine.pool
    assert pool.num_blocks > 0
    used_after = total - torch.cuda.mem_get_info()[0]
    assert used_after <= 0.6 * total * 1.02  # within the target (2% slack for allocator rounding)
    assert used_after >= 0.6 * total * 0.85  # and the KV cache took most of what was left
    out = llm.generate([[5, 6, 7]], GREEDY)[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    # A step of the most tokens (run eagerly: past the prefill graphs) stays within it too.
    steps = llm.engine.config.max_num_batched_tokens
    llm.generate([[5 + i % 100 for i in range(steps)]], SamplingParams(max_tokens=2))
    assert total - torch.cuda.mem_get_info()[0] <= 0.6 * total * 1.02


def test_decode_graph_feeds_its_own_greedy_tokens(shaped, monkeypatch):
    """Batch 1, greedy: after the first decode step, each graph replay finds its input token where
    the previous replay's argmax wrote it, so no device copy runs between graphs; tokens as HF's."""
    from tuili.engine import cuda_graphs

    name, folder, hf = shaped
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8)
    copies = []
    copy_rows = cuda_graphs.copy_rows
    monkeypatch.setattr(cuda_graphs, "copy_rows", lambda *a: copies.append(a[1]) or copy_rows(*a))
    ids = prompts(hf.config.vocab_size)[:1]
    out = llm.generate(ids, GREEDY)
    assert copies == [[0]]  # the first decode step's token came from the prompt step's sampler
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
    assert_within_hf_top5(hf, ids, out)


def test_sampled_decode_replays_sampling_graphs(shaped, monkeypatch):
    """Decode steps with temperature, top-k, top-p and min-p sample in a graph of the width their
    filters need, feeding the next replay's ids in place (no copy at batch 1); seeded tokens are
    the same as with the sampling kernels launched one by one, and top-k keeps to the top k."""
    from tuili.engine import cuda_graphs

    name, folder, hf = shaped
    # No prefix cache: a rerun computes the same logits (a prefix hit changes the prefill's shapes).
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
              enable_prefix_caching=False)
    graphs = llm.engine.runner.graphs
    vocab = hf.config.vocab_size
    widths = []
    real_for = graphs.sampler_for

    def sampler_for(n):
        sample = real_for(n)
        return lambda floats, ints, width: widths.append(width) or sample(floats, ints, width)

    monkeypatch.setattr(graphs, "sampler_for", sampler_for)
    copies = []
    copy_rows = cuda_graphs.copy_rows
    monkeypatch.setattr(cuda_graphs, "copy_rows", lambda *a: copies.append(a[1]) or copy_rows(*a))
    ids = prompts(vocab)
    common = dict(max_tokens=16, ignore_eos=True, logprobs=0)
    kinds = [SamplingParams(temperature=0.7, top_p=0.9, seed=1, **common),
             SamplingParams(temperature=1.0, top_k=40, seed=2, **common),
             SamplingParams(temperature=1.0, min_p=0.2, seed=3, **common),
             SamplingParams(temperature=0.8, top_k=2000, top_p=0.5, seed=4, **common)]
    alone = llm.generate(ids[:1], kinds[0])[0].outputs[0].token_ids
    assert copies == [[0]]  # after the first decode step, each found its ids in place
    assert set(widths) == {vocab}
    assert llm.generate(ids[:1], kinds[0])[0].outputs[0].token_ids == alone
    cases = [([0], {vocab}),  # top_p without top_k: the whole row, sorted
             ([1], {min(vocab, 1024)}),  # top_k: topk candidates, no sort
             ([2], {1}),  # min_p alone: no candidates, the race over the whole row
             ([1, 2, 3], {vocab})]  # a top_k past the candidates: a full sort
    results = []
    for rows, want in cases:
        widths.clear()
        out = llm.generate([ids[i] for i in rows], [kinds[i] for i in rows])
        assert set(widths) == want, (rows, widths)
        results.append([o.outputs[0].token_ids for o in out])
    ranks = [lp.rank for lp in out[0].outputs[0].logprobs]  # the top_k 40 request
    assert all(r <= 40 for r in ranks), ranks
    monkeypatch.setattr(graphs, "sampler_for", lambda n: None)  # the same kernels, eagerly
    for (rows, _), tokens in zip(cases, results):
        out = llm.generate([ids[i] for i in rows], [kinds[i] for i in rows])
        assert [o.outputs[0].token_ids for o in out] == tokens
