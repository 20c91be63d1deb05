"""The fused MoE Triton kernel on the CPU under Triton's interpreter, against the torch reference:
routing with empty experts, an expert taking most tokens, each tile shape the engine picks."""

import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter

use_interpreter("tuili.kernels.triton_moe")
pytestmark = IGNORE_SCALAR_READS

from tuili.kernels import reference_moe, triton_moe  # noqa: E402


def test_align_by_expert_groups_slots_in_padded_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])
    slots, experts = triton_moe.align_by_expert(ids, num_experts=5, block_m=4)
    assert slots.shape[0] == 24  # 6 slots + 3 pad rows for each of at most 5 experts, in blocks
    blocks = slots.view(-1, 4).tolist()
    used = [(e, [s for s in b if s < 6]) for e, b in zip(experts.tolist(), blocks) if e >= 0]
    assert used == [(0, [1, 4]), (1, [3]), (3, [0, 2, 5])]  # slot = token * top_k + j
    assert all(e == -1 for e in experts.tolist()[3:])


@pytest.mark.parametrize("tokens", [1, 9, 100])
def test_fused_moe_matches_reference(tokens):
    torch.manual_seed(tokens)
    hidden, inter, num_experts, top_k = 48, 40, 6, 2
    x = torch.randn(tokens, hidden)
    w13 = torch.randn(num_experts, 2 * inter, hidden) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter) * inter ** -0.5
    logits = torch.randn(tokens, num_experts)
    logits[:, 4] = -1e4  # an expert no token chooses
    logits[: tokens // 2, 2] += 5  # one most tokens choose
    weights, ids = reference_moe.route(logits, top_k, renormalize=False)
    expected = reference_moe.fused_moe(x, w13, w2, weights, ids)
    config = triton_moe.default_config(tokens * top_k, num_experts)
    small = triton_moe.MoETiles(block_m=16, block_n=16, block_k=32)  # several N and K tiles
    for tiles in (config, small):
        out = triton_moe.fused_moe(x, w13, w2, weights, ids, tiles)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
