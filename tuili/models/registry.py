"""Architecture name (HF class) -> model class."""

from __future__ import annotations

from tuili.errors import ModelLoadError
from tuili.models.bert import BertForSequenceClassification, BertModel
from tuili.models.config import ModelConfig, architecture
from tuili.models.gemma3 import Gemma3ForCausalLM
from tuili.models.granite_hybrid import GraniteHybridForCausalLM
from tuili.models.llama import LlamaForCausalLM
from tuili.models.moe import MoEForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": MoEForCausalLM, "Qwen2MoeForCausalLM": MoEForCausalLM,
    "MixtralForCausalLM": MoEForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM, "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
    "GraniteMoeHybridForCausalLM": GraniteHybridForCausalLM,
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
}


def model_class(architecture: str, source: str = ""):
    if architecture not in MODELS:
        where = f"{source}: " if source else ""
        raise ModelLoadError(f"{where}architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(MODELS)}")
    return MODELS[architecture]


def config_from_hf(cfg: dict) -> ModelConfig:
    """An HF config.json's model shape, parsed by its family's class (generically for an
    architecture tuili cannot run, which `tuili analyze` still reads)."""
    cls = MODELS.get(architecture(cfg))
    return cls.config_from_hf(cfg) if cls is not None else ModelConfig.from_hf(cfg)
