"""The Mamba-2 reference kernels against a naive token-by-token recurrence: the chunked SSD scan
(odd lengths, chunk boundaries, an initial state, groups shared by heads), the one-step update,
and the causal conv1d with its carried state; a sequence split anywhere gives the same outputs."""

import pytest
import torch
import torch.nn.functional as F

from tuili.kernels import reference_mamba as rm

HEADS, P, GROUPS, N, CHANNELS, K = 4, 8, 2, 16, 12, 4


def ssd_inputs(t: int, seed: int = 0, heads: int = HEADS, p: int = P, groups: int = GROUPS,
               n: int = N):
    """x [t, heads, p] and B, C [t, groups, n] as column slices of one buffer (as the mixer's
    conv output gives them), dt > 0, A < 0, D."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(t, heads * p + 2 * groups * n, generator=g)
    x, B, C = buf.split([heads * p, groups * n, groups * n], dim=1)
    dt = F.softplus(torch.randn(t, heads, generator=g))
    A = -torch.rand(heads, generator=g) * 2 - 0.1
    D = torch.randn(heads, generator=g)
    return (x.view(t, heads, p), dt, A, B.view(t, groups, n), C.view(t, groups, n), D)


def naive(x, dt, A, B, C, D, state=None):
    """state = exp(dt A) state + dt x B^T; y = state C + D x, one token at a time."""
    t, heads, p = x.shape
    per = heads // B.shape[1]
    state = torch.zeros(heads, p, B.shape[2]) if state is None else state.clone()
    ys = []
    for i in range(t):
        Bh, Ch = B[i].repeat_interleave(per, 0), C[i].repeat_interleave(per, 0)
        state = state * torch.exp(dt[i] * A)[:, None, None] + \
            (dt[i][:, None] * x[i])[:, :, None] * Bh[:, None, :]
        ys.append(torch.einsum("hpn,hn->hp", state, Ch) + D[:, None] * x[i])
    return torch.stack(ys), state


@pytest.mark.parametrize("t,chunk", [(1, 8), (7, 8), (8, 8), (9, 8), (37, 8), (37, 16), (5, 64)])
def test_scan_matches_the_recurrence(t, chunk):
    x, dt, A, B, C, D = ssd_inputs(t, seed=t)
    init = torch.randn(HEADS, P, N)
    for state in (None, init):
        y, final = rm.ssd_scan(x, dt, A, B, C, D, chunk, state)
        y_ref, final_ref = naive(x, dt, A, B, C, D, state)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_update_continues_a_scan():
    """Decode after prefill: the one-step update from the scan's final state, batched over two
    sequences, equals the recurrence over the whole sequence."""
    x, dt, A, B, C, D = ssd_inputs(20, seed=1)
    y_ref, _ = naive(x, dt, A, B, C, D)
    states = []
    for cut in (13, 17):
        _, s = rm.ssd_scan(x[:cut], dt[:cut], A, B[:cut], C[:cut], D, 8)
        states.append(s)
    rows = [13, 17]
    y, new = rm.ssd_update(x[rows], dt[rows], A, B[rows], C[rows], D, torch.stack(states))
    torch.testing.assert_close(y, y_ref[rows], rtol=1e-4, atol=1e-4)
    _, after = naive(x[:14], dt[:14], A, B[:14], C[:14], D)
    torch.testing.assert_close(new[0], after, rtol=1e-4, atol=1e-4)


def naive_conv(x, weight, bias):
    """out[t, c] = silu(bias[c] + sum_k weight[c, k] x[t - K + 1 + k, c]), x zero before 0."""
    t, k = x.shape[0], weight.shape[1]
    padded = torch.cat([torch.zeros(k - 1, x.shape[1]), x])
    out = torch.stack([(padded[i:i + k].t() * weight).sum(1) + bias for i in range(t)])
    return F.silu(out)


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 9])
def test_conv_carries_its_state_across_a_split(cut):
    """A 9-token sequence in two pieces (the first shorter than the kernel, or empty), then one
    decode token: the same outputs as the whole sequence at once."""
    g = torch.Generator().manual_seed(cut)
    x = torch.randn(10, CHANNELS, generator=g)
    weight, bias = torch.randn(CHANNELS, K, generator=g), torch.randn(CHANNELS, generator=g)
    expected = naive_conv(x, weight, bias)
    first, state = rm.conv1d(x[:cut], weight, bias, None)
    second, state = rm.conv1d(x[cut:9], weight, bias, state)
    last, state = rm.conv1d_update(x[9:], weight, bias, state[None])
    torch.testing.assert_close(torch.cat([first, second, last]), expected)
    torch.testing.assert_close(state[0], x[7:10].t())


def test_pool_entry_points_read_and_write_slots():
    """prefill_states/ssd_prefill from zero (cached 0) and from a slot's state (cached > 0), then
    decode_states/ssd_decode: the pool slots hold what the recurrence gives."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(16, CHANNELS, generator=g)
    weight, bias = torch.randn(CHANNELS, K, generator=g), torch.randn(CHANNELS, generator=g)
    conv_pool, out = torch.randn(3, CHANNELS, K - 1), torch.empty(16, CHANNELS)
    rm.prefill_states(xs, weight, bias, conv_pool, [1], [(0, 10, 0)], out)
    rm.prefill_states(xs, weight, bias, conv_pool, [1], [(10, 5, 10)], out)
    out[15:] = rm.decode_states(xs[15:], weight, bias, conv_pool, torch.tensor([1]))
    torch.testing.assert_close(out, naive_conv(xs, weight, bias))
    torch.testing.assert_close(conv_pool[1], xs[13:].t())
    x, dt, A, B, C, D = ssd_inputs(16, seed=4)
    pool = torch.randn(3, HEADS, P, N)  # slot garbage a new sequence must not read
    y = torch.empty(16, HEADS, P)
    rm.ssd_prefill(x, dt, A, B, C, D, 4, pool, [2], [(0, 10, 0)], y)
    rm.ssd_prefill(x, dt, A, B, C, D, 4, pool, [2], [(10, 5, 10)], y)
    y[15:] = rm.ssd_decode(x[15:], dt[15:], A, B[15:], C[15:], D, pool, torch.tensor([2]))
    y_ref, final = naive(x, dt, A, B, C, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool[2], final, rtol=1e-4, atol=1e-4)
