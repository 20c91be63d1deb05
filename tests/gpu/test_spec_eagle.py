"""EAGLE heads on the GPU (bf16, random weights of the Llama-3.1-8B shape, 4 layers, and random
EAGLE-1 and EAGLE-3 heads of its shape): greedy tokens identical to the plain engine's (bf16
ties aside: a verify row is a prefill row, a plain one a decode row), with the target's decode
and verify steps replaying CUDA graphs that put out the tapped hidden states, and the states
the head reads from those graphs the ones a prefill of the whole sequence computes."""

import gc

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.engine.cuda_graphs import DecodeGraphs, PrefillGraphs

from ..eagle_heads import save_head, states_read_and_computed
from .random_models import SHAPES, build
from .test_spec_decode import repeating_prompts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
OPTS = dict(dtype="bfloat16", device="cuda", kv_cache_memory_gb=2, max_num_seqs=8)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-8b-eagle")
    hf = build("llama3-8b", folder)
    vocab = hf.config.vocab_size
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    prompts = repeating_prompts(vocab)
    plain = LLM(str(folder), **OPTS)
    outs = plain.generate(prompts, GREEDY)
    del plain
    gc.collect()
    torch.cuda.empty_cache()
    return folder, prompts, outs


def assert_same_up_to_ties(want, got) -> None:
    """Identical tokens; at a first difference, the plain engine's two best were a bf16 tie."""
    for w, g in zip(want, got):
        a, b = w.outputs[0], g.outputs[0]
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                top = dict(a.logprobs[i].top)
                assert y in top and top[x] - top[y] < 0.1, (i, x, y, top)
                break


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_greedy_identical_in_cuda_graphs(target, method, tmp_path, monkeypatch):
    folder, prompts, plain = target
    cfg = {**SHAPES["llama3-8b"][2], "num_hidden_layers": 4}
    head = save_head(tmp_path / method, cfg, method == "eagle3",
                     draft_vocab=32000 if method == "eagle3" else None)
    llm = LLM(str(folder), speculative_config={
        "method": method, "model": str(head), "num_speculative_tokens": 3,
        "min_acceptance_rate": 0}, **OPTS)
    replays = {"decode": 0, "verify": 0}
    decode_run, prefill_run = DecodeGraphs.run, PrefillGraphs.run

    def decode(self, *args, **kw):
        replays["decode"] += 1
        return decode_run(self, *args, **kw)

    def prefill(self, ids, positions, slots, seqs, tables, sample_rows, *rest):
        replays["verify"] += len(sample_rows) > len(seqs)
        return prefill_run(self, ids, positions, slots, seqs, tables, sample_rows, *rest)

    monkeypatch.setattr(DecodeGraphs, "run", decode)
    monkeypatch.setattr(PrefillGraphs, "run", prefill)
    outs = llm.generate(prompts, GREEDY)
    assert_same_up_to_ties(plain, outs)
    alone = llm.generate(prompts[:1], GREEDY)  # k + 1 rows of one request: a prefill graph
    assert_same_up_to_ties(plain[:1], alone)
    assert replays["verify"] > 0
    # A request whose guesses are kept less often than min_acceptance pauses guessing: its
    # decodes replay decode graphs, whose tap must hand the head the same states a prefill
    # computes (bf16: within rounding).
    spec = llm.engine.speculator
    spec.min_acceptance = 1.0
    decodes = replays["decode"]
    read, computed = states_read_and_computed(llm.engine, monkeypatch, prompts[0], GREEDY)
    assert replays["decode"] > decodes
    assert sorted(read) == list(range(max(read) + 1)) and max(read) > len(prompts[0])
    for pos, state in read.items():
        # EAGLE-3 reads residual streams before three layers' norms (values of several units):
        # bf16's rounding there is relative, so the check is on the whole vector's error.
        err = (state.float() - computed[pos].float()).norm() / computed[pos].float().norm()
        assert err < 0.02, (pos, err)
    assert llm.engine.spec_stats.num_drafts > 0
    pool = llm.engine.pool
    assert pool.num_free == pool.num_blocks
    del llm
    gc.collect()
    torch.cuda.empty_cache()
