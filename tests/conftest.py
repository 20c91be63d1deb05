"""Shared fixtures: the real SmolLM2 GGUF model, in tuili and in HF transformers."""

from __future__ import annotations

import pytest
import torch

from tuili import LLM
from tuili.models.loader import resolve

MODEL = "smollm2-135m"

# Varied prompts: chat-formatted and raw, code, lists, numbers, Chinese, emoji, one token.
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "List three colours:\n1.",
    "12 + 35 = ",
    "从前有一座山，山里有",
    "I love pizza 🍕 because",
    "Once upon a time, in a land far away, there lived a dragon who",
    "The",
]
CHAT_QUESTIONS = [
    "What is the boiling point of water?",
    "Write a haiku about autumn.",
]


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 (an embedding model) in float32, beside sentence-transformers."""
    return LLM("all-minilm-l6-v2", dtype="float32")


@pytest.fixture(scope="session")
def gguf_path():
    return resolve(MODEL)


@pytest.fixture(scope="session")
def llm():
    """tuili in float32, the dtype the HF comparisons run in."""
    return LLM(MODEL, dtype="float32")


@pytest.fixture(scope="session")
def prompts(llm) -> list[list[int]]:
    chat = [llm.render_chat([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
    return [llm.tokenizer.encode(p) for p in RAW_PROMPTS] + chat


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation: a bare forward loop with its KV cache."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens


@pytest.fixture(scope="session")
def hf_reference(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, p, 32) for p in prompts]


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory, gguf_path):
    """The GGUF model written out as an HF folder (safetensors, tokenizer.json, ...)."""
    from tuili.models.export import export_hf_folder

    return export_hf_folder(gguf_path, tmp_path_factory.mktemp("hf") / "smollm2")
