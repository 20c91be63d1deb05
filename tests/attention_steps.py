"""A mixed step's attention metadata shared by the interpreted model-step tests: two decodes
and a chunk of 3 new tokens after 4 cached ones, over 8 blocks of 4 tokens."""

import torch

from tuili.layers.attention import AttentionMetadata


def mixed_step_meta(rope) -> AttentionMetadata:
    lens = torch.tensor([5, 9, 7])
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]])
    positions = torch.tensor([4, 8, 4, 5, 6])
    rows = torch.tensor([0, 1, 2, 2, 2])
    slots = tables[rows, positions // 4] * 4 + positions % 4
    return AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=lens,
                             positions=positions, rope=rope, num_decodes=2, max_decode_len=9,
                             prefills=[(2, 3, 4)],
                             prefill_seqs=torch.tensor([[2], [3], [4]], dtype=torch.int32))
