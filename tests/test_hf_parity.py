"""tuili against HF transformers on the same dequantized SmolLM2 weights (float32)."""

import pytest
import torch

from tuili import SamplingParams

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def test_tokenizer_matches_hf(gguf_path, llm):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    texts = ["Hello world 12345", "从前有一座山 😀🍕", "  leading spaces\n\ttabs", "<|im_start|>user\nhi"]
    for text in texts:
        assert llm.tokenizer.encode(text) == hf_tok(text).input_ids, text
        assert llm.tokenizer.decode(llm.tokenizer.encode(text), skip_special_tokens=False) == text


def test_greedy_one_by_one_matches_hf(llm, prompts, hf_reference):
    for ids, expected in zip(prompts, hf_reference):
        (out,) = llm.generate([ids], GREEDY_32)
        assert out.outputs[0].token_ids == expected


def test_greedy_batched_matches_hf(llm, prompts, hf_reference):
    outs = llm.generate(prompts, GREEDY_32)
    assert [o.outputs[0].token_ids for o in outs] == hf_reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@torch.inference_mode()
def test_prefill_logits_close_to_hf(llm, prompts, hf_model):
    """prompt_logprobs exposes every prefill position's distribution: compare with HF's."""
    ids = prompts[6]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5, logprobs=5)
    (out,) = llm.generate([ids], params)
    hf_lp = hf_model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == ids[pos]
        assert lp.logprob == pytest.approx(hf_lp[pos - 1, ids[pos]].item(), abs=1e-3)
        hf_top = hf_lp[pos - 1].topk(5)
        assert [t for t, _ in lp.top] == hf_top.indices.tolist()
    last = out.outputs[0].logprobs[0]
    assert [v for _, v in last.top] == pytest.approx(hf_lp[-1].topk(5).values.tolist(), abs=1e-3)
    assert last.rank == 1 and last.token_id == int(hf_lp[-1].argmax())
