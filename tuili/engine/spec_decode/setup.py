"""The engine's speculator from its config: the proposer the method names, checked once."""

from __future__ import annotations

import torch

from tuili.speculative_config import SpeculativeConfig
from tuili.engine.spec_decode.ngram import NgramProposer
from tuili.engine.spec_decode.speculator import Speculator


def make_speculator(config, model_config, tokenizer, max_model_len: int, num_blocks: int,
                    dtype: torch.dtype, device: torch.device, target=None,
                    eager: bool = True) -> Speculator | None:
    """None when config.speculative_config is unset (the engine's plain path). `target`: the
    target model, whose hidden states an EAGLE head reads (it sets the model's tap); `eager`:
    the draft's steps replay no CUDA graphs (as the target's)."""
    spec = SpeculativeConfig.parse(config.speculative_config)
    if spec is None:
        return None
    if spec.method == "ngram":
        proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min,
                                 spec.prompt_lookup_max)
    elif spec.method in ("eagle", "eagle3"):
        from tuili.engine.spec_decode.eagle import EagleProposer

        proposer = EagleProposer(spec, config, target, max_model_len, num_blocks, dtype, device,
                                 eager)
    else:
        from tuili.engine.spec_decode.draft_model import DraftModelProposer

        # as many blocks as the target's: the draft never runs out before it does
        proposer = DraftModelProposer(spec, config, model_config, tokenizer, max_model_len,
                                      num_blocks, dtype, device, eager)
    return Speculator(spec, proposer, max_model_len, device.type)
