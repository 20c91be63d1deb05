"""What the engine decides for pooling: the task it serves (with its Pooler's config and the
limits that follow), and whether a pooling request's prompt and params can run."""

from __future__ import annotations

from dataclasses import replace

from tuili.config import EngineConfig
from tuili.errors import InvalidParameter
from tuili.models import loader
from tuili.models.pooling_config import PoolingConfig, find_task, load_pooling_config
from tuili.pooling_params import PoolingParams


def choose_task(config: EngineConfig, loaded: loader.LoadedModel
                ) -> tuple[str, PoolingConfig | None, EngineConfig]:
    """(task, pooling config or None, the config with a pooling model's limits filled in): a
    model with sentence-transformers files caps prompts at its max_seq_length."""
    arch = loaded.config.architecture
    folder = loader.model_folder(loaded.source)
    task = find_task(config.task, arch, folder)
    encoder = getattr(loaded.model, "is_encoder", False)
    if task == "generate":
        if encoder:
            raise InvalidParameter("task", f"{arch} is an encoder: it cannot generate; serve it "
                                           "with task embed or score")
        return task, None, config
    pooling = load_pooling_config(task, arch, folder, config.pooling, config.score_tokens,
                                  loaded.tokenizer)
    if encoder and config.num_kv_blocks is None:
        # No KV cache (the runner binds none): blocks are bookkeeping, a step's worth.
        per_step = config.max_num_batched_tokens // config.block_size + config.max_num_seqs
        config = replace(config, num_kv_blocks=per_step)
    if pooling.max_seq_length and config.max_model_len is None:
        config = replace(config, max_model_len=min(pooling.max_seq_length,
                                                   loaded.config.max_position_embeddings))
    return task, pooling, config


def check_pooling_request(prompt: str | list[int], ids: list[int], params: PoolingParams,
                          limit: int, embedding_size: int) -> None:
    """400s for a pooling request that cannot run: empty, longer than `limit` tokens (it runs
    whole, in one step), token types that do not fit, more dimensions than the model has."""
    if not ids or prompt == "":  # an encoder's tokenizer gives "" its [CLS] and [SEP]
        raise InvalidParameter("input", "is empty; give some text or tokens")
    if len(ids) > limit:
        raise InvalidParameter("input", f"has {len(ids)} tokens, more than the {limit} this "
                                        "model takes (max_model_len, and max_num_batched_tokens: "
                                        "a pooling prompt runs whole); shorten it")
    if params.token_type_ids is not None and len(params.token_type_ids) != len(ids):
        raise InvalidParameter("token_type_ids", f"{len(params.token_type_ids)} for {len(ids)} "
                                                 "tokens")
    if params.dimensions is not None and params.dimensions > embedding_size:
        raise InvalidParameter("dimensions", f"got {params.dimensions}, this model's embeddings "
                                             f"have {embedding_size}")
