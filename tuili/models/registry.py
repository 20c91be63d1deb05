"""Architecture name (HF class) -> model class."""

from __future__ import annotations

from tuili.errors import ModelLoadError
from tuili.models.llama import LlamaForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str, source: str = ""):
    if architecture not in MODELS:
        where = f"{source}: " if source else ""
        raise ModelLoadError(f"{where}architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(MODELS)}")
    return MODELS[architecture]
