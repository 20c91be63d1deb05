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

# the last: granite-4.0-h's head_dim and state width, whose tiles are 32 tokens long
SHAPES = [dict(heads=4, p=8, groups=2, n=16), dict(heads=3, p=20, groups=1, n=24),
          dict(heads=2, p=64, groups=1, n=128)]


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


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_update_with_raw_dt_into_rows_matches_reference(shape):
    """The decode path the mixer takes: dt straight from the projection (a column slice, rows
    strided; its step size clamp(softplus(dt + bias)) taken in the kernel, values past
    softplus's linear threshold and the clamp included), y written into the first rows of a
    larger buffer."""
    x, _, A, B, C, D = ssd_inputs(3, seed=9, **shape)
    heads = shape["heads"]
    proj = torch.randn(3, heads + 5) * 4
    proj[0, 5] = 25.0  # past the threshold: softplus(x) = x
    raw, bias = proj[:, 5:], torch.randn(heads)
    pool = torch.randn(5, heads, shape["p"], shape["n"])
    slots, limits = torch.tensor([1, 4, 0]), (0.01, 8.0)
    expected_pool = pool.clone()
    expected = reference_mamba.ssd_decode(x, raw, A, B, C, D, expected_pool, slots,
                                          dt_bias=bias, dt_limits=limits)
    y = torch.zeros(5, heads, shape["p"])
    triton_mamba.ssd_decode(x, raw, A, B, C, D, pool, slots, out=y[:3], dt_bias=bias,
                            dt_limits=limits)
    torch.testing.assert_close(y[:3], expected, rtol=1e-4, atol=1e-4)
    assert not y[3:].any()
    torch.testing.assert_close(pool, expected_pool, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,channels", [(1, 48), (4, 64), (2, 40)])
def test_gated_rms_norm_matches_reference(groups, channels):
    g = torch.Generator().manual_seed(groups)
    y = torch.randn(3, channels, generator=g)
    proj = torch.randn(3, channels + 7, generator=g).bfloat16()
    z = proj[:, 7:]  # the gate as a column slice of the projection
    weight = (torch.rand(channels, generator=g) + 0.5).bfloat16()
    expected = reference_mamba.gated_rms_norm(y, z, weight, 1e-5, channels // groups)
    out = triton_mamba.gated_rms_norm(y, z, weight, 1e-5, channels // groups)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("saves", [None, [(2, 5, 1)]])
def test_mixer_step_with_triton_scan_matches_reference(saves):
    """A whole mixer over a mixed step (two decodes, a prefill carrying its state, one starting
    from zero) with Triton's conv and scan in place of the references: same outputs, same pools; and with
    the first prefill's state snapshotted 5 tokens into its chunk (the step split in two phases),
    the same outputs as without, the snapshot what the pool held there."""
    from tuili.layers.attention import AttentionMetadata
    from tuili.layers.backend import TORCH
    from tuili.layers.mamba2 import Mamba2Mixer
    from tuili.models.mamba_config import MambaConfig

    torch.manual_seed(0)
    m = MambaConfig(layers=[0], num_heads=4, head_dim=8, state_size=16, n_groups=2, chunk_size=8)
    mixers = [Mamba2Mixer(m, 32, 1e-5, TORCH) for _ in range(3)]
    for p in mixers[0].parameters():
        p.data.normal_(0, 0.3)
    for mixer in mixers[1:]:
        mixer.load_state_dict(mixers[0].state_dict())
    mixers[1]._kernels = triton_mamba
    conv, ssm = mixers[0].state_shapes()
    conv_pool, ssm_pool = torch.randn(5, *conv), torch.randn(5, *ssm)
    h = torch.randn(17, 32, generator=torch.Generator().manual_seed(1))
    outs, pools = [], []
    for i, mixer in enumerate(mixers):
        mixer.conv_state, mixer.ssm_state = conv_pool.clone(), ssm_pool.clone()
        mixer.conv_snapshots, mixer.ssm_snapshots = torch.zeros(2, *conv), torch.zeros(2, *ssm)
        prefills = [(2, 11, 6), (13, 4, 0)]
        meta = AttentionMetadata(
            slot_mapping=None, block_tables=None, seq_lens=None, positions=None, rope=None,
            num_decodes=2, max_decode_len=0, prefills=prefills,
            prefill_seqs=torch.tensor(list(zip(*prefills)), dtype=torch.int32),
            state_slots=torch.tensor([3, 1, 0, 4]), state_slot_list=[3, 1, 0, 4],
            state_saves=saves if i < 2 else None)
        outs.append(mixer(h, meta))
        pools.append((mixer.conv_state, mixer.ssm_state))
    for i in (1, 2):
        torch.testing.assert_close(outs[i], outs[0], rtol=1e-4, atol=1e-4)
        for a, b in zip(pools[i], pools[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if saves:
        # the snapshot: the state after the prefill's first 5 tokens, as a step of those alone
        alone = mixers[2]
        alone.conv_state, alone.ssm_state = conv_pool.clone(), ssm_pool.clone()
        meta = AttentionMetadata(
            slot_mapping=None, block_tables=None, seq_lens=None, positions=None, rope=None,
            num_decodes=0, max_decode_len=0, prefills=[(0, 5, 6)],
            state_slots=torch.tensor([0]), state_slot_list=[0])
        alone(h[2:7], meta)
        for mixer in mixers[:2]:
            torch.testing.assert_close(mixer.conv_snapshots[1], alone.conv_state[0])
            torch.testing.assert_close(mixer.ssm_snapshots[1], alone.ssm_state[0], rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_kernels_match_reference(bias):
    """The conv of three prefill chunks (1 token after 6 cached: its window reaches into the
    state; 40 tokens from zero over a dirty slot; 2 tokens after 3 cached, fewer than the kernel)
    and of two decode rows, x a column slice of a wider projection, against the references."""
    channels, k = 70, 4
    g = torch.Generator().manual_seed(9)
    proj = torch.randn(45, channels + 30, generator=g)
    conv_x = proj[:, 10:10 + channels]
    weight, b = torch.randn(channels, k, generator=g), torch.randn(channels, generator=g)
    b = b if bias else None
    pool = torch.randn(5, channels, k - 1, generator=g)
    prefills, slots = [(2, 1, 6), (3, 40, 0), (43, 2, 3)], [4, 0, 2]
    ref_pool, ref_out = pool.clone(), torch.zeros(45, channels)
    reference_mamba.prefill_states(conv_x, weight, b, ref_pool, slots, prefills, ref_out)
    ref_out[:2] = reference_mamba.decode_states(conv_x[:2], weight, b, ref_pool,
                                                torch.tensor([1, 3]))
    out = torch.zeros(45, channels)
    seqs = torch.tensor(list(zip(*prefills)), dtype=torch.int32)
    triton_mamba.prefill_states(conv_x, weight, b, pool, torch.tensor(slots), seqs, out)
    out[:2] = triton_mamba.decode_states(conv_x[:2], weight, b, pool, torch.tensor([1, 3]))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool, ref_pool)
