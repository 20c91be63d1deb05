"""How a pooling model turns token states into its output: read from the checkpoint's
sentence-transformers files (modules.json, 1_Pooling/config.json, sentence_bert_config.json)
and the architecture, overridden by the engine's options."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuili.errors import InvalidParameter, ModelLoadError
from tuili.models.tokenizer import Tokenizer

_ST = "sentence_transformers.models."
# 1_Pooling/config.json flag -> our pooling
_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
          "pooling_mode_lasttoken": "last"}
_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass
class PoolingConfig:
    task: str  # "embed" or "score"
    pooling: str  # "cls", "mean" or "last"
    normalize: bool  # embeddings: L2-normalize unless the request says otherwise
    max_seq_length: int | None = None  # sentence-transformers' limit on prompt tokens
    score_token_ids: tuple[int, int] | None = None  # decoder scorers: the (no, yes) tokens


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
    st_pooling, normalize, max_len = _sentence_transformers(folder)
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
    return PoolingConfig(task, pooling, normalize, max_len, token_ids)


def _sentence_transformers(folder: Path | None) -> tuple[str | None, bool | None, int | None]:
    """(pooling, normalize, max_seq_length) from the sentence-transformers files, None where
    there are none."""
    if folder is None or not (folder / "modules.json").exists():
        return None, None, None
    modules = _json(folder / "modules.json")
    kinds = {m.get("type", "").removeprefix(_ST): m for m in modules}
    unknown = sorted(set(kinds) - _KNOWN_MODULES)
    if unknown:
        raise ModelLoadError(f"{folder}/modules.json: sentence-transformers modules "
                             f"{', '.join(unknown)} are not supported (only "
                             f"{', '.join(sorted(_KNOWN_MODULES))})")
    pooling = None
    if "Pooling" in kinds:
        cfg = _json(folder / kinds["Pooling"].get("path", "1_Pooling") / "config.json")
        modes = [mode for flag, mode in _MODES.items() if cfg.get(flag)]
        others = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v
                  and k not in _MODES]
        if others or len(modes) != 1:
            raise ModelLoadError(f"{folder}: pooling {', '.join(others) or modes} is not "
                                 "supported; one of cls, mean or lasttoken is")
        pooling = modes[0]
    st_config = folder / "sentence_bert_config.json"
    max_len = _json(st_config).get("max_seq_length") if st_config.exists() else None
    return pooling, "Normalize" in kinds, max_len


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
