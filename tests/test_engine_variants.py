"""The same greedy tokens however the engine schedules them: prefix hits, preemption, chunked
prefill, block sizes, and the HF-folder load path."""

import pytest

from tuili import LLM, SamplingParams

from .conftest import MODEL

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_prefix_cache_hits_give_same_output(prompts, hf_reference):
    llm = LLM(MODEL, dtype="float32", block_size=4)
    first = tokens(llm.generate(prompts, GREEDY_32))
    stats = llm.engine.prefix_cache_stats
    hits_before = stats.hits
    again = llm.generate(prompts, GREEDY_32)
    assert tokens(again) == first == hf_reference
    assert stats.hits - hits_before >= sum((len(p) - 1) // 4 * 4 for p in prompts)
    assert all(o.num_cached_tokens > 0 for o, p in zip(again, prompts) if len(p) > 4)
    kv = llm.engine.kv  # finished requests leave no table, hashes or registration behind
    assert not kv.tables and not kv.hashes and not kv.registered


def test_shared_system_prompt_hits_within_one_batch(llm):
    system = {"role": "system", "content": "You are a terse assistant who answers in one line."}
    convs = [[system, {"role": "user", "content": q}] for q in ("Name a fruit.", "Name a tree.")]
    stats = llm.engine.prefix_cache_stats
    before = stats.hits
    first = llm.chat(convs[:1], GREEDY_32)
    second = llm.chat(convs[1:], GREEDY_32)
    assert stats.hits - before >= 16
    assert second[0].num_cached_tokens >= 16
    fresh = LLM(MODEL, dtype="float32", enable_prefix_caching=False)
    assert tokens(fresh.chat(convs, GREEDY_32)) == tokens(first) + tokens(second)
    assert fresh.engine.prefix_cache_stats.hits == 0


def test_preemption_when_cache_is_small(prompts, hf_reference):
    # 12 blocks x 16 tokens: far less than 10 prompts x ~45 tokens need at once.
    llm = LLM(MODEL, dtype="float32", num_kv_blocks=12, max_model_len=128)
    outs = llm.generate(prompts, GREEDY_32)
    assert llm.engine.num_preemptions > 0
    assert tokens(outs) == hf_reference


def test_chunked_prefill_forced(prompts, hf_reference):
    llm = LLM(MODEL, dtype="float32", max_num_batched_tokens=7)
    assert tokens(llm.generate(prompts, GREEDY_32)) == hf_reference


def test_no_chunked_prefill_needs_whole_prompt_budget():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(MODEL, dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=64)


@pytest.mark.parametrize("block_size", [1, 32])
def test_block_sizes(block_size, prompts, hf_reference):
    llm = LLM(MODEL, dtype="float32", block_size=block_size, max_num_seqs=4)
    assert tokens(llm.generate(prompts, GREEDY_32)) == hf_reference


def test_hf_folder_path_equals_gguf_path(smollm2_folder, llm, prompts):
    folder = smollm2_folder
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"}
    from_folder = LLM(str(folder), dtype="float32")
    text = "Hello world, 你好 😀"
    assert from_folder.tokenizer.encode(text) == llm.tokenizer.encode(text)
    chat = [{"role": "user", "content": "Hi!"}]
    assert from_folder.render_chat(chat) == llm.render_chat(chat)
    assert tokens(from_folder.generate(prompts, GREEDY_32)) == tokens(llm.generate(prompts, GREEDY_32))


def test_a_dropped_engine_is_freed_before_the_next_one_starts():
    """Start-up freezes what it built out of the collector's way (gc.freeze); an engine dropped
    later must still be collected, cycles included, once the next engine starts: the frozen
    generation does not grow from one engine to the next (it grew by ~2,300 objects and ~400 MB
    an engine, until the CI's workers were killed for memory)."""
    import gc

    sizes = []
    for _ in range(3):
        llm = LLM(MODEL, max_num_seqs=2)
        assert llm.generate(["hi"], SamplingParams(max_tokens=2))
        sizes.append(gc.get_freeze_count())
        del llm
    assert sizes[2] - sizes[1] < 500, sizes
