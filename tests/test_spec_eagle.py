"""EAGLE heads on SmolLM2 (random-weight EAGLE-1/2 and EAGLE-3 heads of its shape, saved as the
public checkpoints are): greedy tokens identical to no speculation, batched with requests and
steps that do not speculate, under preemption and prefix hits; the head reads the target's own
states of real tokens; bad head checkpoints get errors that name what is wrong."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.errors import ModelLoadError
from tuili.models.eagle import load_head

from .conftest import MODEL
from .eagle_heads import save_head, states_read_and_computed

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ONE_STEP = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)  # never guesses
REPEATING = "def area(w, h):\n    return w * h\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def target_config(llm) -> dict:
    return llm.engine.model_config.to_hf()


@pytest.fixture(scope="module")
def batch(llm, prompts):
    """Five prompts of unequal lengths, one of which decodes a single step (so never guesses),
    and their plain greedy tokens."""
    ids = [llm.tokenizer.encode(REPEATING)] + prompts[:2] + prompts[8:10]  # the last two: chat
    # unequal lengths: the batch shrinks below disable_by_batch_size, then guesses
    params = [replace(GREEDY, max_tokens=n) for n in (10, 6)] + [ONE_STEP] + \
        [replace(GREEDY, max_tokens=n) for n in (10, 8)]
    return ids, params, tokens(llm.generate(ids, params))


# EAGLE-1 as safetensors, EAGLE-3 (a draft vocabulary of 8192 tokens) as pytorch_model.bin
HEADS = {"eagle": (False, "safetensors", None), "eagle3": (True, "bin", 8192)}


@pytest.fixture(scope="module", params=list(HEADS))
def eagle(request, target_config, tmp_path_factory):
    eagle3, fmt, vocab = HEADS[request.param]
    folder = save_head(tmp_path_factory.mktemp("heads") / request.param, target_config, eagle3,
                       fmt, draft_vocab=vocab)
    # 7 blocks of 16 tokens: fewer than the batch needs at once (preemption); at most 3
    # decodes speculate in a step (steps above that run plain); every request keeps guessing
    return LLM(MODEL, dtype="float32", num_kv_blocks=7, max_model_len=112, speculative_config={
        "method": request.param, "model": str(folder), "num_speculative_tokens": 3,
        "disable_by_batch_size": 3, "min_acceptance_rate": 0})


def test_greedy_identical_batched_with_preemption_and_prefix_hits(eagle, batch):
    ids, params, plain = batch
    engine = eagle.engine
    stats = engine.spec_stats
    assert tokens(eagle.generate(ids, params)) == plain
    assert engine.num_preemptions > 0
    assert stats.num_drafts > 0 and stats.num_steps_off > 0
    drafts = stats.num_drafts
    long = [0, 1]
    for run in range(2):  # alone, the second time from the prefix cache
        again = eagle.generate([ids[i] for i in long], [params[i] for i in long])
        assert tokens(again) == [plain[i] for i in long]
    assert again[0].num_cached_tokens >= 16
    assert stats.num_drafts > drafts
    proposer = engine.speculator.proposer
    assert not proposer.seqs and proposer.kv.pool.num_free == proposer.kv.pool.num_blocks
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("eagle", ["eagle3"], indirect=True)  # -inf outside its vocabulary
def test_sampled_and_seeded(eagle):
    p = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=6, seed=5, n=2, ignore_eos=True)
    first, again = eagle.generate([REPEATING], p)[0], eagle.generate([REPEATING], p)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert all(len(o.token_ids) == 6 for o in first.outputs)


@pytest.mark.parametrize("eagle", ["eagle3"], indirect=True)
def test_head_reads_the_targets_states_of_real_tokens(eagle, batch, monkeypatch):
    """Every state the head reads for a real entry is the target's at that position, as a
    plain prefill of the whole sequence computes it (rejected drafts' states dropped)."""
    prompt = batch[0][0]
    read, computed = states_read_and_computed(eagle.engine, monkeypatch, prompt, GREEDY)
    # entries 0, 1, ... each read once its state was known, up to the last guess's start
    assert sorted(read) == list(range(max(read) + 1))
    assert max(read) >= max(computed) - 1 - 4 > len(prompt)  # the prefill: every position
    for pos, state in read.items():
        torch.testing.assert_close(state, computed[pos], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("change, match", [
    (dict(hidden_size=64), "hidden_size 64, the target's is 576"),
    (dict(drop=("fc.weight",)), "no fc.weight"),
    (dict(drop=("layers.0.mlp.down_proj.weight",)), "lacks layers.0.mlp.down_proj.weight"),
    (dict(eagle3=True, drop=("d2t",), draft_vocab=1000), "needs d2t"),
    (dict(method="eagle3"), "an EAGLE-1/2 head"),
])
def test_bad_head_checkpoint_names_the_problem(change, match, llm, target_config, tmp_path):
    change = dict(change)
    method = change.pop("method", "eagle")
    eagle3 = change.pop("eagle3", False)
    folder = save_head(tmp_path / "head", target_config, eagle3, **change)
    with pytest.raises(ModelLoadError, match=match):
        load_head(str(folder), method, llm.engine.runner.model, torch.float32,
                  torch.device("cpu"))


def test_fc_of_the_wrong_width_is_refused(llm, target_config, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_head(tmp_path / "head", target_config, False)
    weights = load_file(folder / "model.safetensors")
    weights["fc.weight"] = weights["fc.weight"][:, :700].contiguous()
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"fc.weight is \[576, 700\], must be \[576, 1152\]"):
        load_head(str(folder), "eagle", llm.engine.runner.model, torch.float32,
                  torch.device("cpu"))
