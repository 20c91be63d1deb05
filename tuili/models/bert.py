"""The BERT family as encoders: BertModel (token states for embeddings) and
BertForSequenceClassification (cross-encoders). Absolute positions, token types, post-norm, GELU.

Checkpoint names follow HF transformers; query/key/value load into one merged projection.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tuili.layers import onednn_linear
from tuili.layers.backend import TORCH, Backend
from tuili.layers.encoder_attention import EncoderMetadata, encoder_attention, sdpa_backends
from tuili.models.config import ModelConfig

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
_PARTS = {"query": 0, "key": 1, "value": 2}


class BertLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        h, eps = c.hidden_size, c.hf.get("layer_norm_eps", 1e-12)
        self.heads, self.d = c.num_heads, c.head_dim
        self.qkv = nn.Linear(h, 3 * h)
        self.attention_out = nn.Linear(h, h)
        self.attention_norm = nn.LayerNorm(h, eps)
        self.intermediate = nn.Linear(h, c.intermediate_size)
        self.output = nn.Linear(c.intermediate_size, h)
        self.output_norm = nn.LayerNorm(h, eps)
        self.act_name = c.hf.get("hidden_act", "gelu")
        self.act = _ACTIVATIONS[self.act_name]
        self.linears = None  # (qkv, attention out, intermediate + activation, output): prepare()

    def prepare(self) -> None:
        """Choose the linears once the weights are in: oneDNN's with the weights reordered on the
        CPU where it runs (layers/onednn_linear.py), F.linear on the parameters elsewhere."""
        parts = [(self.qkv, None), (self.attention_out, None), (self.intermediate, self.act_name),
                 (self.output, None)]
        packed = [onednn_linear.pack(lin, act) for lin, act in parts]
        if all(p is not None for p in packed):
            self.linears = tuple(packed)
            return
        # Functional calls on the parameters: a small batch's step is short enough that
        # nn.Module's call overhead (~50 calls a step) shows.
        qkv, out, up, down = (lin for lin, _ in parts)
        act = self.act
        self.linears = (lambda x: F.linear(x, qkv.weight, qkv.bias),
                        lambda x: F.linear(x, out.weight, out.bias),
                        lambda x: act(F.linear(x, up.weight, up.bias)),
                        lambda x: F.linear(x, down.weight, down.bias))

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        qkv, out, up, down = self.linears
        n1, n2 = self.attention_norm, self.output_norm
        attended = encoder_attention(qkv(x).view(x.shape[0], 3, self.heads, self.d), meta)
        x = F.layer_norm(x + out(attended), n1.normalized_shape,
                         n1.weight, n1.bias, n1.eps)
        return F.layer_norm(x + down(up(x)), n2.normalized_shape, n2.weight, n2.bias, n2.eps)


class BertModel(nn.Module):
    is_encoder = True  # the runner gives it whole sequences and no KV cache
    PREFIX = ""  # where the encoder's tensors sit in the checkpoint

    @staticmethod
    def config_from_hf(cfg: dict) -> ModelConfig:
        return ModelConfig.from_hf(cfg, rms_norm_eps=cfg.get("layer_norm_eps", 1e-12))

    def __init__(self, c: ModelConfig, backend: Backend = TORCH):
        super().__init__()
        self.config, self.backend = c, backend
        act = c.hf.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: "
                             f"{', '.join(_ACTIVATIONS)}")
        if c.hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        h = c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, h)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(c.hf.get("type_vocab_size", 2), h)
        self.embedding_norm = nn.LayerNorm(h, c.hf.get("layer_norm_eps", 1e-12))
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))

    def forward(self, input_ids: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """Token states [tokens, hidden] of whole sequences laid flat."""
        if self.layers[0].linears is None:  # the first step, after load_weights
            for layer in self.layers:
                layer.prepare()
        # Functional calls, as in BertLayer.prepare: nn.Module's call costs a few us each, and a
        # launch-bound GPU forward of a batch of texts pays it ~15 times.
        types, norm = self.token_type_embeddings.weight, self.embedding_norm
        x = (F.embedding(input_ids, self.word_embeddings.weight)
             + F.embedding(meta.positions, self.position_embeddings.weight))
        if meta.token_type_ids is not None:
            x = x + F.embedding(meta.token_type_ids, types)
        else:  # every token in segment 0
            x = x + types[0]
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        with sdpa_backends():
            for layer in self.layers:
                x = layer.forward(x, meta)
        return x

    def attention_layers(self) -> list:
        return []  # no KV cache

    def _place(self, name: str) -> tuple[str, int | None]:
        """Our parameter for an HF tensor name, and the q/k/v part it fills (None: all of it)."""
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                            "LayerNorm.bias")
        if name.startswith("embeddings."):
            rest = name.removeprefix("embeddings.")
            return ("embedding_norm." + rest.split(".")[-1] if rest.startswith("LayerNorm")
                    else rest), None
        parts = name.split(".")  # encoder.layer.N.<path>.weight|bias
        if parts[:2] != ["encoder", "layer"]:
            return name, None
        layer, path, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if path.startswith("attention.self."):
            return f"layers.{layer}.qkv.{kind}", _PARTS[path.split(".")[-1]]
        local = {"attention.output.dense": "attention_out",
                 "attention.output.LayerNorm": "attention_norm", "intermediate.dense":
                 "intermediate", "output.dense": "output", "output.LayerNorm": "output_norm"}
        return f"layers.{layer}.{local.get(path, path)}.{kind}", None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; every parameter must be filled."""
        params = dict(self.named_parameters())
        filled = set()
        for name, tensor in weights:
            if name.startswith(self.PREFIX):
                name = name.removeprefix(self.PREFIX)
            elif self.PREFIX and not name.startswith(("classifier.", "pooler.")):
                continue
            if name.endswith("position_ids") or (name.startswith("pooler.") and
                                                 "pooler.weight" not in params):
                continue  # a buffer; BertModel's pooler head, which embeddings do not use
            target, part = self._place(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            dest = param.data if part is None else param.data.chunk(3)[part]
            if dest.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(dest.shape)}")
            dest.copy_(tensor)
            filled.add((target, part))
        missing = [n for n in params
                   if (n, None) not in filled and not all((n, p) in filled for p in range(3))]
        if missing:
            raise KeyError("checkpoint lacks tensors: " + ", ".join(missing[:8]))
        for layer in self.layers:
            layer.linears = None  # packed again from the new weights on the next step


class BertForSequenceClassification(BertModel):
    """A cross-encoder: BERT over a (query, document) pair, its [CLS] state through the pooler
    (dense + tanh) and the classifier."""
    PREFIX = "bert."

    def __init__(self, c: ModelConfig, backend: Backend = TORCH):
        super().__init__(c, backend)
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        self.classifier = nn.Linear(c.hidden_size, c.hf.get("num_labels") or
                                    len(c.hf.get("id2label") or {0: 0, 1: 1}))

    def _place(self, name: str) -> tuple[str, int | None]:
        if name.startswith("pooler.dense."):
            return "pooler." + name.split(".")[-1], None
        return super()._place(name)

    def classify(self, cls_states: torch.Tensor) -> torch.Tensor:
        """Logits [seqs, labels] from each sequence's first ([CLS]) token state."""
        return self.classifier(torch.tanh(self.pooler(cls_states)))
