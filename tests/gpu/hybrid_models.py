"""Random-weight granite-4.0-h models (GraniteMoeHybridForCausalLM) of published shapes, their
layer stack cut down, saved as HF folders: for the GPU tests and benchmarks/gpu_hybrid.py."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.gpu.random_models import byte_tokenizer

# granite-4.0-h-micro (dense, ~3B) and granite-4.0-h-tiny (64 experts, top 6): one attention
# layer in ten, no rotary ("nope"), granite's multipliers.
SHAPES = {
    "granite-4.0-h-micro": dict(
        vocab_size=100352, hidden_size=2048, shared_intermediate_size=8192, intermediate_size=512,
        num_local_experts=0, num_experts_per_tok=0, num_attention_heads=16, num_key_value_heads=4,
        mamba_n_heads=64, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
        mamba_chunk_size=256, mamba_expand=2, position_embedding_type="nope",
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
        logits_scaling=8.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
    "granite-4.0-h-tiny": dict(
        vocab_size=100352, hidden_size=1536, shared_intermediate_size=1024, intermediate_size=512,
        num_local_experts=64, num_experts_per_tok=6, num_attention_heads=12,
        num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128,
        mamba_n_groups=1, mamba_chunk_size=256, mamba_expand=2, position_embedding_type="nope",
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
        logits_scaling=6.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
}


def layer_types(num_layers: int, every: int = 10) -> list[str]:
    """One attention layer per `every` (granite-4.0-h's 4 of 40), the first at `every` // 2,
    and at least one."""
    types = ["mamba"] * num_layers
    for i in range(min(every // 2, num_layers - 1), num_layers, every):
        types[i] = "attention"
    return types


def build(name: str, folder: Path, num_layers: int, every: int = 10, dtype=torch.bfloat16,
          **overrides):
    """Save a random `name`-shaped model of `num_layers` layers; return the HF model on the GPU."""
    import transformers

    cfg = {**SHAPES[name], **overrides}
    config = transformers.GraniteMoeHybridConfig(
        **cfg, num_hidden_layers=num_layers, layer_types=layer_types(num_layers, every),
        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.GraniteMoeHybridForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return model
