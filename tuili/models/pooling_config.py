"""How a pooling model turns token states into its output: read from the checkpoint's
sentence-transformers files (modules.json, 1_Pooling/config.json, sentence_bert_config.json,
Dense modules' config.json and weights) and the architecture, overridden by the engine's options.
Module types are read by their class name, so the old (`sentence_transformers.models.Dense`) and
the newer (`sentence_transformers.base.modules.dense.Dense`) spellings both load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuili.errors import InvalidParameter, ModelLoadError
from tuili.models.tokenizer import Tokenizer

# 1_Pooling/config.json: the old flags and the newer `pooling_mode` values -> our pooling
_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
          "pooling_mode_lasttoken": "last"}
_MODE_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
# the order sentence-transformers runs them in, as far as we support it
_ORDER = {"Transformer": 0, "Pooling": 1, "Dense": 2, "Normalize": 3}


@dataclass
class DenseLayer:
    """A sentence-transformers Dense module after pooling: act(x @ weight.T + bias), plus x (or
    x @ residual.T) with use_residual. Float32, as the pooled vector is."""
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None
    activation: torch.nn.Module
    residual: torch.Tensor | bool = False  # True: add x itself; a tensor: add x @ residual.T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(torch.nn.functional.linear(x, self.weight, self.bias))
        if self.residual is True:
            return out + x
        if isinstance(self.residual, torch.Tensor):
            return out + x @ self.residual.T
        return out

    def to(self, device: torch.device) -> DenseLayer:
        move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
        return DenseLayer(move(self.weight), move(self.bias), self.activation,
                          move(self.residual))


@dataclass
class PoolingConfig:
    task: str  # "embed" or "score"
    pooling: str  # "cls", "mean" or "last"
    normalize: bool  # embeddings: L2-normalize unless the request says otherwise
    max_seq_length: int | None = None  # sentence-transformers' limit on prompt tokens
    score_token_ids: tuple[int, int] | None = None  # decoder scorers: the (no, yes) tokens
    dense: list[DenseLayer] = field(default_factory=list)  # after pooling, before normalizing

    def embedding_size(self, hidden_size: int) -> int:
        """The width of the embeddings: the last Dense module's, else the model's."""
        return self.dense[-1].weight.shape[0] if self.dense else hidden_size


def find_task(requested: str, architecture: str, folder: Path | None) -> str:
    """The task the engine serves: the one asked for, else the architecture's, else embed for a
    checkpoint with sentence-transformers files and generate for the rest."""
    if requested != "auto":
        return requested
    if architecture == "BertForSequenceClassification":
        return "score"
    if architecture == "BertModel" or (folder is not None and (folder / "modules.json").exists()):
        return "embed"
    return "generate"


def load_pooling_config(task: str, architecture: str, folder: Path | None, pooling: str,
                        score_tokens: str | None, tokenizer: Tokenizer) -> PoolingConfig:
    """The pooling of a model serving `task` ("embed" or "score"); options beat the files."""
    encoder = architecture.startswith("Bert")
    st_pooling, normalize, max_len, dense = _sentence_transformers(folder)
    if pooling == "auto":
        pooling = st_pooling or ("cls" if encoder else "last")
    token_ids = None
    if task == "score" and architecture != "BertForSequenceClassification":
        if encoder:
            pass  # a bi-encoder scores by cosine similarity of embeddings
        elif score_tokens is None:
            raise InvalidParameter("score_tokens", "a decoder serving task=score needs the token "
                                   "pair whose logits score, e.g. --score-tokens no,yes")
        else:
            token_ids = tuple(_single_token(tokenizer, w) for w in score_tokens.split(","))
    if normalize is None:  # no sentence-transformers files: decoders (Qwen3-Embedding) do
        normalize = not encoder
    return PoolingConfig(task, pooling, normalize, max_len, token_ids, dense)


def _sentence_transformers(folder: Path | None
                           ) -> tuple[str | None, bool | None, int | None, list[DenseLayer]]:
    """(pooling, normalize, max_seq_length, dense layers) from the sentence-transformers files,
    None (and no layers) where there are none."""
    if folder is None or not (folder / "modules.json").exists():
        return None, None, None, []
    modules = [(_module_kind(folder, m), m) for m in _json(folder / "modules.json")]
    kinds = [k for k, _ in modules]
    if kinds != sorted(kinds, key=_ORDER.__getitem__) or \
            any(kinds.count(k) > 1 for k in ("Transformer", "Pooling", "Normalize")):
        raise ModelLoadError(f"{folder}/modules.json: modules in the order {kinds} are not "
                             "supported (Transformer, Pooling, any Dense, Normalize)")
    pooling = None
    dense = []
    for kind, m in modules:
        if kind == "Pooling":
            pooling = _pooling_mode(folder, _json(folder / m.get("path", "1_Pooling") /
                                                  "config.json"))
        elif kind == "Dense":
            dense.append(_dense(folder / m["path"]))
    st_config = folder / "sentence_bert_config.json"
    max_len = _json(st_config).get("max_seq_length") if st_config.exists() else None
    return pooling, "Normalize" in kinds, max_len, dense


def _module_kind(folder: Path, module: dict) -> str:
    """A modules.json entry's class name, if it is one we run."""
    kind = module.get("type", "")
    name = kind.rsplit(".", 1)[-1]
    if not kind.startswith("sentence_transformers.") or name not in _ORDER:
        raise ModelLoadError(f"{folder}/modules.json: sentence-transformers module {kind!r} is "
                             f"not supported (only {', '.join(_ORDER)})")
    return name


def _pooling_mode(folder: Path, cfg: dict) -> str:
    """Our pooling for a Pooling module's config: old boolean flags or the newer pooling_mode."""
    if "pooling_mode" in cfg:
        given = cfg["pooling_mode"]
        modes = [given] if isinstance(given, str) else list(given)
        ours = [_MODE_NAMES.get(m, m) for m in modes]
    else:
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
        ours = [_MODES.get(m, m) for m in modes]
    if len(ours) != 1 or ours[0] not in _MODE_NAMES.values():
        raise ModelLoadError(f"{folder}: pooling {modes} is not supported; one of cls, mean or "
                             "lasttoken is")
    return ours[0]


def _dense(path: Path) -> DenseLayer:
    """A Dense module's layer from its config.json and weights (safetensors or .bin)."""
    cfg = _json(path / "config.json")
    if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding" or \
            cfg.get("module_output_name") not in (None, "sentence_embedding"):
        raise ModelLoadError(f"{path}: only Dense modules on the sentence embedding are supported")
    activation = cfg.get("activation_function") or "torch.nn.modules.activation.Tanh"
    act_class = getattr(torch.nn, activation.rsplit(".", 1)[-1], None)
    if not activation.startswith("torch.") or not (isinstance(act_class, type) and
                                                   issubclass(act_class, torch.nn.Module)):
        raise ModelLoadError(f"{path}: activation {activation!r} is not a torch.nn module")
    weights = _module_weights(path)
    weight = weights.get("linear.weight")
    shape = (cfg.get("out_features"), cfg.get("in_features"))
    if weight is None or tuple(weight.shape) != shape:
        raise ModelLoadError(f"{path}: linear.weight is "
                             f"{None if weight is None else tuple(weight.shape)}, config says "
                             f"{shape}")
    bias = weights.get("linear.bias") if cfg.get("bias", True) else None
    if cfg.get("bias", True) and bias is None:
        raise ModelLoadError(f"{path}: bias is on but linear.bias is missing")
    residual: torch.Tensor | bool = False
    if cfg.get("use_residual"):
        residual = True if shape[0] == shape[1] else weights.get("residual.weight")
        if residual is None:
            raise ModelLoadError(f"{path}: use_residual needs residual.weight")
    as_float = (lambda t: t.float() if isinstance(t, torch.Tensor) else t)
    return DenseLayer(weight.float(), as_float(bias), act_class().eval(), as_float(residual))


def _module_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{path}: no model.safetensors or pytorch_model.bin")


def _single_token(tokenizer: Tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise InvalidParameter("score_tokens", f"{word!r} is {len(ids)} tokens in this "
                                               "vocabulary; each must be one token")
    return ids[0]


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from e
