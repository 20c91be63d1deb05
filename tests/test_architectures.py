"""Every Llama-family variant against HF transformers: tiny random-weight models saved as HF
folders (with SmolLM2's tokenizer), greedy tokens compared one by one and batched."""

import shutil

import pytest
import torch

from tuili import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "llama3-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64})),
    "mistral-mha": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, sliding_window=None)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qknorm-mqa": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)),
}
PROMPTS = ["The capital of France is", "def add(a, b):", "从前有一座山"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, smollm2_folder):
    config_cls, model_cls, extra = VARIANTS[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra, initializer_range=0.1)
    model = getattr(transformers, model_cls)(config).eval()
    if hasattr(model.model.layers[0].self_attn.q_proj, "bias") and \
            model.model.layers[0].self_attn.q_proj.bias is not None:
        with torch.no_grad():  # make the biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder / name)
    return request.param, folder, model


@torch.inference_mode()
def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_matches_hf(variant):
    name, folder, model = variant
    llm = LLM(str(folder), dtype="float32", block_size=8)
    assert llm.engine.model_config.architecture == model.config.architectures[0]
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = [hf_greedy(model, ids, 16) for ids in prompts]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts] == expected, name
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected, name
