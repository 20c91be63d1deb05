"""A tiny Llama-shaped model with random weights, saved as an HF folder (tests/test_router.py,
tests/test_tensor_parallel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuili.models.gguf_file import open_gguf


def tiny_llama(folder: Path, gguf_path: Path | None, heads: int = 4, kv: int = 1,
               inter: int = 256, tokenizer=None) -> None:
    """A Llama-shaped model with random weights: by default 4 query heads, 1 KV head (so 2 ranks
    hold it replicated), q/k/v biases, an untied LM head over a vocabulary that does not split
    evenly over 2 (SmolLM2's tokenizer, its chat template, and 3 spare ids). It loads in a
    fraction of SmolLM2's time: for tests where the model's words are not the point.
    tokenizer: a `tokenizers.Tokenizer` in place of SmolLM2's (its vocabulary and 3 spare ids;
    no chat template), for a smaller embedding and LM head."""
    folder.mkdir()
    if tokenizer is None:
        smol = open_gguf(gguf_path).tokenizer()
        tokenizer = smol.backend
        (folder / "chat_template.jinja").write_text(smol.chat_template)
    tokenizer.save(str(folder / "tokenizer.json"))
    h, d, vocab, layers = 128, 32, tokenizer.get_vocab_size() + 3, 2
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
           "tie_word_embeddings": False, "attention_bias": True, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rand(vocab, h, std=1.0), "model.norm.weight": 1 + rand(h),
         "lm_head.weight": rand(vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + rand(h),
              p + "post_attention_layernorm.weight": 1 + rand(h),
              p + "self_attn.q_proj.weight": rand(heads * d, h),
              p + "self_attn.k_proj.weight": rand(kv * d, h),
              p + "self_attn.v_proj.weight": rand(kv * d, h),
              p + "self_attn.q_proj.bias": rand(heads * d),
              p + "self_attn.k_proj.bias": rand(kv * d), p + "self_attn.v_proj.bias": rand(kv * d),
              p + "self_attn.o_proj.weight": rand(h, heads * d),
              p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
              p + "mlp.down_proj.weight": rand(h, inter)}
    save_file(w, str(folder / "model.safetensors"))
