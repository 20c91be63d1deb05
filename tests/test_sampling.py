"""Sampling on the real model: seeds, n, stops, min/max tokens, logprobs, penalties, filters."""

import math

import pytest
import torch

from tuili import SamplingParams
from tuili.engine.sampler import apply_penalties, top_k_top_p, top_k_top_p_sorted

PROMPT = "Write a short poem about the sea:\n"


def texts(outs):
    return [o.outputs[0].text for o in outs]


def test_same_seed_same_tokens_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)] * 3
    batch = llm.generate(["Tell me a joke.", PROMPT, "Count to ten:", "Hi"],
                         [others[0], seeded, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
    again = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    assert again == alone
    other_seed = llm.generate([PROMPT], seeded.with_defaults(seed=99))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_differ_and_are_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    (out,) = llm.generate([PROMPT], params)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    seqs = [tuple(o.token_ids) for o in out.outputs]
    assert len(set(seqs)) == 3 and all(len(s) == 16 for s in seqs)
    assert [tuple(o.token_ids) for o in llm.generate([PROMPT], params)[0].outputs] == seqs


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12))
    topk1 = llm.generate([PROMPT], SamplingParams(temperature=0.8, top_k=1, max_tokens=12))
    assert topk1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_stop_string_trims_and_reports(llm):
    base = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=20))
    full = base[0].outputs[0].text
    assert " 5" in full
    (out,) = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=20, stop=[" 5"]))
    o = out.outputs[0]
    assert o.text == full[: full.index(" 5")]
    assert (o.finish_reason, o.stop_reason) == ("stop", " 5")
    (inc,) = llm.generate(["Count: 1, 2, 3,"], SamplingParams(
        temperature=0, max_tokens=20, stop=[" 5"], include_stop_str_in_output=True))
    assert inc.outputs[0].text == full[: full.index(" 5") + 2]


def test_streamed_deltas_never_show_a_stop_string(llm):
    params = SamplingParams(temperature=0, max_tokens=20, stop=[", 5"])
    deltas = [o.outputs[0].delta_text for o in llm.stream("Count: 1, 2, 3,", params)]
    joined = "".join(deltas)
    assert ", 5" not in joined and joined == llm.generate(["Count: 1, 2, 3,"], params)[0].outputs[0].text


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    stop_at = greedy.token_ids[3]
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))
    o = out.outputs[0]
    assert o.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_at) + 1]
    assert (o.finish_reason, o.stop_reason) == ("stop", stop_at)
    chat = llm.render_chat([{"role": "user", "content": "Say hi."}])
    ended = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert ended.finish_reason == "stop" and ended.token_ids[-1] in llm.engine.eos_token_ids
    assert "<|im_end|>" not in ended.text


def test_min_tokens_ignore_eos_and_max_tokens(llm):
    chat = llm.render_chat([{"role": "user", "content": "Say hi."}])
    short = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    n = len(short.token_ids)
    longer = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 5))
    assert len(longer[0].outputs[0].token_ids) >= n + 5
    ignored = llm.generate([chat], SamplingParams(temperature=0, max_tokens=n + 8, ignore_eos=True))
    o = ignored[0].outputs[0]
    assert len(o.token_ids) == n + 8 and o.finish_reason == "length"
    assert o.token_ids[:n] == short.token_ids


def test_logprobs_shape_and_consistency(llm):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    o = llm.generate([PROMPT], params)[0].outputs[0]
    assert len(o.logprobs) == 6
    for token, lp in zip(o.token_ids, o.logprobs):
        assert lp.token_id == token and lp.rank == 1 and len(lp.top) == 3
        assert lp.top[0] == (token, pytest.approx(lp.logprob))
        assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    assert o.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in o.logprobs))


def test_sampled_tokens_follow_the_distribution(llm):
    """With temperature 1 and no filters, a token's sampled logprob has rank >= 1 and many samples
    land on the most likely token about as often as its probability says."""
    params = SamplingParams(n=40, temperature=1.0, max_tokens=1, logprobs=1, seed=3)
    (out,) = llm.generate(["The capital of France is"], params)
    top_token, top_lp = out.outputs[0].logprobs[0].top[0]
    hits = sum(o.token_ids[0] == top_token for o in out.outputs)
    p = math.exp(top_lp)
    assert abs(hits / 40 - p) < 4 * math.sqrt(p * (1 - p) / 40) + 0.05


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}])
def test_penalties_break_repetition(llm, penalty):
    def repeats(**kw):
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw)
        ids = llm.generate(["apple, apple, apple, apple,"], params)[0].outputs[0].token_ids
        return len(ids) - len(set(ids))

    assert repeats() >= 12 and repeats(**penalty) <= 6


def test_repetition_penalty_matches_hf_rule():
    transformers = pytest.importorskip("transformers")

    class R:
        def __init__(self, ids, out, rep, freq=0.0, pres=0.0):
            self.token_ids, self.output_token_ids = ids, out
            self.params = type("P", (), dict(repetition_penalty=rep, frequency_penalty=freq,
                                             presence_penalty=pres))

    logits = torch.randn(2, 50)
    reqs = [R([1, 5, 7, 7], [7], 1.3), R([2, 3], [3, 3], 1.0, freq=0.5, pres=0.25)]
    ours = apply_penalties(logits.clone(), reqs)
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 5, 7, 7]]), logits[:1].clone())
    assert torch.allclose(ours[0], hf[0])
    expected = logits[1].clone()
    expected[3] -= 2 * 0.5 + 0.25
    assert torch.allclose(ours[1], expected)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = top_k_top_p(logits, top_k=[0, 2], top_p=[0.7, 1.0])
    kept = torch.isfinite(out)
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]


# 50: flat rows need the full sort. may_wait=False is the GPU's policy (no reading the device to
# choose): rows with top_p and no top_k take the full sort at once.
@pytest.mark.parametrize("may_wait", [True, False])
@pytest.mark.parametrize("temperature", [0.5, 3.0, 50.0])
def test_top_k_top_p_without_full_sort_keeps_the_same_tokens(temperature, may_wait):
    torch.manual_seed(int(temperature))
    V = 5000
    logits = torch.randn(6, V) * 4 / temperature
    top_k, top_p = [0, 40, 0, 3000, 0, 7], [0.9, 0.8, 1.0, 0.95, 0.5, 1.0]
    ours = torch.isfinite(top_k_top_p(logits, top_k, top_p, may_wait))
    k = [kk or V for kk in top_k]
    p = torch.tensor([pp if pp < 1 else 2.0 for pp in top_p])[:, None]
    sorted_ = torch.isfinite(top_k_top_p_sorted(logits, k, p))
    assert torch.equal(ours, sorted_)
    assert ours[2].all()  # no filter: every token stays
    assert ours[5].sum() == 7
    # without a top_p-only row, both policies rank candidates only; still the same tokens
    kk, pp = [40, 0, 7], [0.8, 1.0, 1.0]
    assert torch.equal(torch.isfinite(top_k_top_p(logits[:3], kk, pp, may_wait)),
                       torch.isfinite(top_k_top_p_sorted(logits[:3], [40, V, 7],
                                                         torch.tensor([[0.8], [2.0], [2.0]]))))


BAD_PARAMS = [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21),
    ("prompt_logprobs", -1), ("stop", [""]), ("stop_token_ids", [-3]), ("n", 1.5),
    ("temperature", "hot"), ("seed", 1.5), ("stop", [3]),
]


@pytest.mark.parametrize("name,value", BAD_PARAMS)
def test_bad_parameter_rejected_with_its_name(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_abandoned_stream_frees_its_blocks(llm):
    pool = llm.engine.pool
    stream = llm.stream("Tell me a long story.", SamplingParams(temperature=0, max_tokens=100))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert not llm.engine.has_unfinished_requests()
    assert all(count == 0 for count in pool.ref_counts)
