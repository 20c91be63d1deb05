"""Speculative decoding on SmolLM2: greedy tokens identical to no speculation (n-gram and draft
models; batched with requests that do not speculate; prefix hits; preemption), KV blocks and
prefix-cache hashes consistent after rollbacks, seeded sampling reproducible, and the sampling
options (penalties, stops, logprobs, n, structured output) still honoured."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tuili import LLM, SamplingParams
from tuili.errors import InvalidParameter

from .conftest import MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
# Prompts that repeat themselves (code to edit, a text to summarise), where n-gram lookup guesses.
REPEATING = [
    "def area(w, h):\n    return w * h\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n"
    "# the same two functions, with type hints:\ndef area(w: float, h: float) -> float:\n",
    "Text: The river rose in the night and the village woke to water in the streets. The "
    "mayor called for boats. By noon the river had fallen.\nSummary: The river rose in the",
]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def all_prompts(prompts, llm):
    return [llm.tokenizer.encode(p) for p in REPEATING] + prompts


@pytest.fixture(scope="module")
def plain(llm, all_prompts):
    return tokens(llm.generate(all_prompts, GREEDY))


@pytest.fixture(scope="module")
def ngram():
    # 16 blocks of 16 tokens: far less than 12 prompts of 5-70 tokens + 32 outputs need at once
    return LLM(MODEL, dtype="float32", num_kv_blocks=16, max_model_len=160, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
        "disable_by_batch_size": 64})


def check_kv_consistent(engine) -> None:
    """Every block free again, no tables or hashes left; each cached block's hash is the hash
    of real tokens (recomputing a prompt hits it and gives the same tokens: the tests do)."""
    kv, pool = engine.kv, engine.pool
    assert not kv.tables and not kv.hashes and not kv.registered
    assert pool.num_free == pool.num_blocks and not any(pool.ref_counts)
    assert all(pool.block_hash[b] == h for h, b in pool.cached.items())


def test_ngram_greedy_identical_batched_with_preemption(ngram, all_prompts, plain):
    outs = ngram.generate(all_prompts, GREEDY)
    stats = ngram.engine.spec_stats
    assert tokens(outs) == plain
    assert ngram.engine.num_preemptions > 0
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    check_kv_consistent(ngram.engine)


def test_ngram_one_at_a_time_then_prefix_hits(ngram, all_prompts, plain):
    stats = ngram.engine.spec_stats
    before = stats.num_accepted_tokens
    first = tokens(ngram.generate(all_prompts[:2], GREEDY))  # alone: no preemption
    assert first == plain[:2] and stats.num_accepted_tokens - before >= 16  # they repeat
    again = ngram.generate(all_prompts[:2], GREEDY)
    assert tokens(again) == plain[:2] and all(o.num_cached_tokens >= 32 for o in again)
    check_kv_consistent(ngram.engine)


def test_rollback_keeps_tables_and_hashes_of_real_tokens(ngram, all_prompts):
    """After every step: a request holds exactly the blocks its computed tokens need (rejected
    drafts' blocks given back), and each block it registered is hashed from real tokens."""
    from tuili.engine.kv_cache import chain_hash

    engine, bs = ngram.engine, ngram.engine.config.block_size
    stats = engine.spec_stats
    rejected_before = stats.num_draft_tokens - stats.num_accepted_tokens
    engine.add_request("rollback", all_prompts[0], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
        for req in engine.scheduler.running:
            if req.draft is not None:
                continue  # its verify step is in flight: its drafts count as computed
            table = engine.kv.tables[req.request_id]
            assert len(table) == engine.kv.blocks_needed(req.num_computed_tokens)
            assert req.num_computed_tokens == req.num_tokens - 1  # the new token is pending
            parent = None
            for i in range(engine.kv.registered[req.request_id]):
                parent = chain_hash(parent, req.token_ids[i * bs:(i + 1) * bs])
                assert engine.pool.block_hash[table[i]] == parent
    assert stats.num_draft_tokens - stats.num_accepted_tokens > rejected_before  # some rolled back
    check_kv_consistent(engine)


def test_off_switch_for_large_batches(ngram, all_prompts, plain):
    spec = ngram.engine.speculator
    config = spec.config
    spec.config = replace(config, disable_by_batch_size=3)
    try:
        off = spec.stats.num_steps_off
        assert tokens(ngram.generate(all_prompts[:6], GREEDY)) == plain[:6]
        assert spec.stats.num_steps_off > off
    finally:
        spec.config = config


def test_sampling_options_still_hold(ngram, llm):
    prompt = REPEATING[0]
    # greedy with penalties, a stop string and logprobs: the same as without speculation
    p = SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.2,
                       frequency_penalty=0.3, stop=["perimeter"], logprobs=2, min_tokens=5)
    want, got = llm.generate([prompt], p)[0].outputs[0], ngram.generate([prompt], p)[0].outputs[0]
    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text,
                                                           want.finish_reason)
    for a, b in zip(want.logprobs, got.logprobs):
        assert (a.token_id, a.rank) == (b.token_id, b.rank)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # seeded sampling with n = 3: reproducible, and the samples differ
    s = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=30, seed=11, n=3)
    first = ngram.generate([prompt], s)[0]
    again = ngram.generate([prompt], s)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    assert all(len(o.token_ids) == 30 or o.finish_reason == "stop" for o in first.outputs)
    check_kv_consistent(ngram.engine)


def test_structured_output_decodes_plainly(ngram):
    pytest.importorskip("xgrammar")
    from tuili.structured.params import StructuredOutputs

    p = SamplingParams(temperature=0, max_tokens=20,
                       structured_outputs=StructuredOutputs(choice=["yes", "no"]))
    out = ngram.generate(["Is water wet? Answer yes or no:"], p)[0].outputs[0]
    assert out.text in ("yes", "no")


@pytest.fixture(scope="module")
def truncated_smollm2(smollm2_folder, tmp_path_factory):
    """SmolLM2 cut to its first 8 of 30 layers, as an HF folder: a cheap, worse draft."""
    import safetensors.torch

    out = tmp_path_factory.mktemp("draft") / "smollm2-8-layers"
    out.mkdir()
    for f in smollm2_folder.iterdir():
        if f.suffix == ".safetensors":
            tensors = safetensors.torch.load_file(f)
            keep = {k: v for k, v in tensors.items()
                    if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < 8}
            safetensors.torch.save_file(keep, out / f.name)
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            config["num_hidden_layers"] = 8
            (out / f.name).write_text(json.dumps(config))
        elif f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("draft", ["self", "truncated"])
def test_draft_model_greedy_identical(draft, truncated_smollm2, all_prompts, plain):
    model = MODEL if draft == "self" else str(truncated_smollm2)
    llm = LLM(MODEL, dtype="float32", speculative_config={
        "model": model, "num_speculative_tokens": 3})
    picks = [0, 1, 3, 6]  # repeating and not, batched together
    short = replace(GREEDY, max_tokens=24)
    outs = tokens(llm.generate([all_prompts[i] for i in picks], short))
    assert outs == [plain[i][:24] for i in picks]
    stats = llm.engine.spec_stats
    if draft == "self":  # the target guessing itself: every guess kept
        assert stats.acceptance_rate > 0.95
    else:
        assert 0 < stats.acceptance_rate < 0.95
    check_kv_consistent(llm.engine)
    assert not llm.engine.speculator.proposer.seqs
    draft_pool = llm.engine.speculator.proposer.kv.pool
    assert draft_pool.num_free == draft_pool.num_blocks


@pytest.mark.parametrize("config, match", [
    ('{"method": "ngram"', "not JSON"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "depth": 3}, "unknown keys"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
      "prompt_lookup_max": 2}, "prompt_lookup_max"),
])
def test_bad_speculative_config_is_refused(config, match):
    from tuili.config import EngineConfig

    with pytest.raises(InvalidParameter, match=match):
        EngineConfig(speculative_config=config).validate()


def test_metrics_and_bench_report_acceptance(ngram, all_prompts, capsys):
    import argparse

    from tuili.bench.commands import _finish
    from tuili.engine_core import EngineLoop
    from tuili.server.metrics import Metrics

    ngram.generate(all_prompts[:1], GREEDY)
    stats = ngram.engine.spec_stats
    published = EngineLoop(ngram.engine, None).stats()  # what the engine loop publishes after a step
    text = Metrics(lambda: published).render().decode()
    assert f"tuili:spec_decode_num_draft_tokens_total {float(stats.num_draft_tokens)}" in text
    assert f"tuili:spec_decode_num_accepted_tokens_total {float(stats.num_accepted_tokens)}" in text
    assert f"tuili:spec_decode_acceptance_rate {stats.acceptance_rate}" in text
    results = {}
    _finish(argparse.Namespace(plot=None, output=None), ngram, results, [])
    assert results["speculative"]["num_accepted_tokens"] == stats.num_accepted_tokens
    assert f"{stats.num_draft_tokens} tokens proposed" in capsys.readouterr().out
