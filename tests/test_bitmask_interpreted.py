"""Structured output's bitmask -> logits kernel on the CPU under Triton's interpreter, against
its torch reference, and the reference against xgrammar's own apply_token_bitmask_inplace (an
independent oracle of the layout). tests/gpu/test_structured_gpu.py runs it compiled, in the
sampling CUDA graphs."""


import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter

from tuili.kernels import reference

use_interpreter("tuili.kernels.triton_bitmask")
pytestmark = IGNORE_SCALAR_READS

from tuili.kernels import triton_bitmask  # noqa: E402


def random_bitmask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = (vocab + 31) // 32
    bits = torch.randint(0, 2 ** 32, (rows, words), generator=g, dtype=torch.int64)
    mask = bits.to(torch.int32)  # wraps: the sign bit (token 31 of a word) is exercised too
    mask[0] = -1  # a row without a grammar: everything allowed
    mask[-1] = 0
    mask[-1, 1] = 1 << 3  # a row with a single allowed token (35)
    return mask


@pytest.mark.parametrize("vocab", [100, 4096 + 70])  # a partial last word; two blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference(vocab, dtype):
    mask = random_bitmask(3, vocab, vocab)
    logits = torch.randn(3, vocab).to(dtype)
    want = logits.clone()
    reference.apply_bitmask(want, mask)
    got = logits.clone()
    triton_bitmask.apply_bitmask(got, mask)
    assert torch.equal(got, want)
    assert torch.equal(got[0], logits[0])
    assert torch.isfinite(got[-1]).nonzero().flatten().tolist() == [35]


def test_reference_equals_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    vocab = 1000
    mask = random_bitmask(4, vocab, 1)
    logits = torch.randn(4, vocab)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, mask, vocab_size=vocab)
    reference.apply_bitmask(logits, mask)
    assert torch.equal(logits, want)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="does not cover"):
        triton_bitmask.apply_bitmask(torch.zeros(2, 100), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not cover"):
        reference.apply_bitmask(torch.zeros(2, 100), torch.zeros(1, 4, dtype=torch.int32))
