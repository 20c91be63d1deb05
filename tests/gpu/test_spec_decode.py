"""Speculative decoding on the GPU (bf16, random weights of the Llama-3-8B shape, 4 layers): the
greedy tokens of n-gram and draft-model speculation stay within HF's top-5 as the plain
engine's do, verify steps replay the prefill CUDA graphs, and rejection sampling on the device
follows the exact law (the CPU test's oracle)."""

import gc

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.engine.cuda_graphs import PrefillGraphs
from tuili.engine.spec_decode.rejection import rejection_sample

from .random_models import build
from .test_gpu_engine import assert_within_hf_top5

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-8b-spec")
    hf = build("llama3-8b", folder).float()
    yield folder, hf
    del hf
    gc.collect()
    torch.cuda.empty_cache()


def repeating_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    base = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (6, 11, 40)]
    return [b * 3 for b in base] + [torch.randint(2, vocab, (70,), generator=g).tolist()]


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 4},
                                  {"model": "self", "num_speculative_tokens": 3}],
                         ids=["ngram", "draft-self"])
def test_speculative_greedy_within_hf_top5(llama, spec, monkeypatch):
    folder, hf = llama
    spec = dict(spec)
    if spec.get("model") == "self":
        spec["model"] = str(folder)
    if spec.get("method") == "ngram":
        # Random weights copy nothing from the context, so no n-gram of theirs would ever match:
        # the lookup is fed HF's own greedy guesses instead (the CPU tests cover the lookup; this
        # one is about the verify rows on the GPU).
        from tuili.engine.spec_decode import ngram

        @torch.inference_mode()
        def hf_guesses(tokens, k, n_min, n_max):
            ids = list(tokens)
            for _ in range(k):
                logits = hf(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1]
                ids.append(int(logits.argmax()))
            return ids[len(tokens):]

        monkeypatch.setattr(ngram, "lookup", hf_guesses)
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8,
              speculative_config=spec)
    verify_replays = []
    real_run = PrefillGraphs.run

    def run(self, ids, positions, slots, seqs, tables, sample_rows, *rest):
        verify_replays.append(len(sample_rows) > len(seqs))
        return real_run(self, ids, positions, slots, seqs, tables, sample_rows, *rest)

    monkeypatch.setattr(PrefillGraphs, "run", run)
    prompts = repeating_prompts(hf.config.vocab_size)
    outs = llm.generate(prompts, GREEDY)  # batched: 4 x (k + 1) rows run eagerly
    assert_within_hf_top5(hf, prompts, outs)
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    verify_replays.clear()
    alone = llm.generate(prompts[:1], GREEDY)  # one request: k + 1 <= 8 rows fit the graphs
    assert_within_hf_top5(hf, prompts[:1], alone)
    assert any(verify_replays)
    if "model" in spec:  # the target as its own draft: most guesses kept (bf16 ties aside:
        assert stats.acceptance_rate > 0.5  # the draft decodes, the target verifies as a prefill)
    pool = llm.engine.pool
    assert pool.num_free == pool.num_blocks


def test_rejection_sampling_on_the_device_follows_the_law():
    from tests.test_spec_rejection import K, V, chi_square_p, law_of_draft_model, random_dists

    g = torch.Generator().manual_seed(5)
    p, q = random_dists(g, K + 1).float(), random_dists(g, K, zero_some=False).float()
    n = 200_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T
    dev = torch.device("cuda")
    gd = torch.Generator(device=dev).manual_seed(6)
    kept, final = rejection_sample(
        p.repeat(n, 1).to(dev), torch.arange(n, device=dev) * (K + 1),
        torch.full((n,), K, device=dev), drafts.to(dev), q.expand(n, K, V).contiguous().to(dev),
        torch.rand(n, K, generator=gd, device=dev),
        torch.empty(n, K + 1, V, device=dev).exponential_(generator=gd))
    counts = {}
    for d, a, f in zip(drafts.tolist(), kept.tolist(), final.tolist()):
        seq = tuple(d[:a]) + (f,)
        counts[seq] = counts.get(seq, 0) + 1
    assert chi_square_p(counts, law_of_draft_model(p.double(), q.double()), n) > 1e-3
