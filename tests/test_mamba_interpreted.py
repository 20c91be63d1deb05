"""The Triton Mamba-2 SSD kernels on the CPU under Triton's interpreter, against the torch
references: the chunked scan over a step's several prefill sequences (odd lengths, tiles' ends,
a state carried in from an earlier chunk, another started from zero over a dirty slot) and the
one-step update at slots, with head_dim and state widths that leave part of a block unused."""

import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter
from tests.test_mamba_kernels import ssd_inputs

use_interpreter("tuili.kernels.triton_mamba")
pytestmark = IGNORE_SCALAR_READS

from tuili.kernels import reference_mamba, triton_mamba  # noqa: E402

SHAPES = [dict(heads=4, p=8, groups=2, n=16), dict(heads=3, p=20, groups=1, n=24)]


@pytest.mark.parametrize("shape", SHAPES)
def test_scan_matches_reference(shape):
    # three prefills: 1 token from zero, 70 tokens (past a 64-token tile) carrying slot 0's
    # state, 33 tokens from zero in a slot holding another sequence's leftovers
    lens, cached, slots = [1, 70, 33], [0, 12, 0], [3, 0, 1]
    t = sum(lens) + 2  # two decode rows first, untouched here
    x, dt, A, B, C, D = ssd_inputs(t, seed=7, **shape)
    pool = torch.randn(4, shape["heads"], shape["p"], shape["n"])
    starts = [2, 3, 73]
    prefills = list(zip(starts, lens, cached))
    expected_pool, expected = pool.clone(), torch.zeros(t, shape["heads"], shape["p"])
    reference_mamba.ssd_prefill(x, dt, A, B, C, D, 16, expected_pool, slots, prefills, expected)
    y = torch.zeros_like(expected)
    seqs = torch.tensor(list(zip(*prefills)), dtype=torch.int32)
    triton_mamba.ssd_prefill(x, dt, A, B, C, D, 16, pool, torch.tensor(slots), seqs, y)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool, expected_pool, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_update_matches_reference(shape):
    x, dt, A, B, C, D = ssd_inputs(3, seed=8, **shape)
    pool = torch.randn(5, shape["heads"], shape["p"], shape["n"])
    slots = torch.tensor([4, 0, 2])
    expected_pool = pool.clone()
    expected = reference_mamba.ssd_decode(x, dt, A, B, C, D, expected_pool, slots)
    y = triton_mamba.ssd_decode(x, dt, A, B, C, D, pool, slots)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool, expected_pool, rtol=1e-4, atol=1e-4)
