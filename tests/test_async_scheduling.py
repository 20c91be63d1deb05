"""Asynchronous scheduling (the GPU default, forced on here on CPU) plans each step before the last
step's tokens are read back. It must change nothing a user sees: the same tokens, texts, finish
reasons, logprobs and streamed deltas as the synchronous loop, through stops, limits, preemption,
prefix hits, chunked prefill and aborts."""

import pytest

from tuili import LLM, SamplingParams

from .conftest import MODEL

PROMPTS = ["The capital of France is", "List three colours:\n1.", "def add(a, b):\n    ",
           "Once upon a time, in a land far away, there lived a dragon who", "12 + 35 = "]


def mixed_params(llm):
    eos = sorted(llm.engine.eos_token_ids)
    comma = llm.tokenizer.encode(",")[-1]
    return [
        SamplingParams(temperature=0, max_tokens=40),  # may stop at EOS
        SamplingParams(temperature=0, max_tokens=40, stop=["\n3."]),
        SamplingParams(temperature=0.9, seed=7, max_tokens=24, logprobs=3, stop_token_ids=[comma]),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=3, max_tokens=30, n=2,
                       repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=eos,
                       prompt_logprobs=2),
    ]


def run(asynchronous: bool, **options):
    llm = LLM(MODEL, dtype="float32", async_scheduling=asynchronous, **options)
    return llm, llm.generate(PROMPTS, mixed_params(llm))


def summary(outs):
    """What a user sees; logprob values rounded (a preempted request is recomputed in another
    batch, where float sums may differ in the last bits)."""
    def lps(entries):
        return [None if e is None else (e.token_id, e.rank, round(e.logprob, 3),
                                        [(t, round(v, 3)) for t, v in e.top]) for e in entries or []]

    return [(o.prompt_token_ids, lps(o.prompt_logprobs),
             [(c.token_ids, c.text, c.finish_reason, c.stop_reason, lps(c.logprobs))
              for c in o.outputs]) for o in outs]


@pytest.fixture(scope="module")
def sync_outputs():
    return summary(run(False)[1])


@pytest.mark.parametrize("options", [{}, {"num_kv_blocks": 7, "max_model_len": 96},
                                     {"max_num_batched_tokens": 9, "block_size": 4}],
                         ids=["plain", "preempting", "chunked"])
def test_async_outputs_equal_sync(sync_outputs, options):
    llm, outs = run(True, **options)
    assert summary(outs) == sync_outputs
    if "num_kv_blocks" in options:
        assert llm.engine.num_preemptions > 0
    finish = {c.finish_reason for o in outs for c in o.outputs}
    assert finish == {"stop", "length"}
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks  # every block given back


def test_async_streaming_deltas_and_prefix_hits():
    sync = LLM(MODEL, dtype="float32", async_scheduling=False)
    llm = LLM(MODEL, dtype="float32", async_scheduling=True, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=20, stop=[" is"])
    for prompt in PROMPTS[:3] * 2:  # the second round hits the prefix cache
        chunks = list(llm.stream(prompt, params))
        final = chunks[-1].outputs[0]
        assert "".join(c.outputs[0].delta_text for c in chunks) == final.text
        assert sum(len(c.outputs[0].delta_token_ids) for c in chunks) == len(final.token_ids)
        expected = sync.generate([prompt], params)[0].outputs[0]
        assert (final.token_ids, final.text, final.finish_reason) == (
            expected.token_ids, expected.text, expected.finish_reason)
    assert llm.engine.prefix_cache_stats.hits > 0


def test_async_abort_mid_flight_frees_everything():
    llm = LLM(MODEL, dtype="float32", async_scheduling=True)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=50,
                                                           ignore_eos=True))
    for _ in range(4):
        engine.step()
    # A token is in flight for every running request: pending until the next step reads it.
    assert all(r.num_pending == 1 for r in engine.scheduler.running)
    engine.abort_request("r1")
    engine.abort_request("r3")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in ("r1", "r3")
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["r0", "r2", "r4"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert all(min(o.outputs[0].token_ids) >= 0 for o in finished.values())  # no placeholder
    assert engine.pool.num_free == engine.pool.num_blocks
