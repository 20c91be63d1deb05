"""Triton Mamba-2 kernels beside reference_mamba (the oracle): the causal conv of a step's
prefill chunks and of its decodes, the chunked SSD scan of its prefill sequences and the one-step
update of its decodes, each reading and writing the states at the sequences' slots of the conv
pool [slots, channels, K - 1] and the SSM pool [slots, heads, head_dim, state] in place.

The chunked scan: one program per (sequence, head, block of head_dim rows) walks its sequence a
tile of BLOCK_L tokens at a time, the state block [BLOCK_P, state] held in registers: within a
tile the outputs are (C_i . B_j) masked to j <= i and decayed by exp(cum_i - cum_j), plus the
carried state read through C_i and decayed by exp(cum_i); the state then decays by the tile's
whole decay and takes each token's dt_j x_j B_j^T decayed to the tile's end. The tile is the
kernel's own: any chunking gives the same sums (the config's chunk_size only moves rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ssd_update_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, state_ptr, slots_ptr, y_ptr,
                       dt_bias_ptr, dt_min, dt_max, stride_x, stride_bc, stride_dt,
                       HEADS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr,
                       N: tl.constexpr, RAW_DT: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """One program per (decode row, head, block of head_dim rows). RAW_DT: dt is the in_proj's
    output, its step size clamp(softplus(dt + dt_bias)) taken here (softplus linear above 20,
    as torch's)."""
    row, h, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = h // HEADS_PER_GROUP
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp, mn = offs_p < P, offs_n < N
    mask = mp[:, None] & mn[None, :]
    s_ptrs = state_ptr + (slot * HEADS + h) * P * N + offs_p[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row * stride_dt + h).to(tl.float32)
    if RAW_DT:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    a = tl.load(a_ptr + h).to(tl.float32)
    bv = tl.load(b_ptr + row * stride_bc + g * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + row * stride_bc + g * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    s = s * tl.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(s * cv[None, :], axis=1) + tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + (row * HEADS + h) * P + offs_p, y, mask=mp)


@triton.jit
def _ssd_scan_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, state_ptr, slots_ptr, seqs_ptr,
                     y_ptr, num_seqs, stride_x, stride_bc, HEADS: tl.constexpr,
                     HEADS_PER_GROUP: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, h, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = h // HEADS_PER_GROUP
    start = tl.load(seqs_ptr + seq).to(tl.int64)
    n = tl.load(seqs_ptr + num_seqs + seq)
    cached = tl.load(seqs_ptr + 2 * num_seqs + seq)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mp, mn = offs_p < P, offs_n < N
    s_mask = mp[:, None] & mn[None, :]
    s_ptrs = state_ptr + (slot * HEADS + h) * P * N + offs_p[:, None] * N + offs_n[None, :]
    # a sequence's first chunk starts from zero; a later one from the state its last step left
    s = tl.load(s_ptrs, mask=s_mask & (cached > 0), other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h).to(tl.float32)
    d = tl.load(d_ptr + h).to(tl.float32)
    causal = offs_l[:, None] >= offs_l[None, :]
    for t0 in range(0, n, BLOCK_L):
        ml = (t0 + offs_l) < n
        rows = start + t0 + offs_l
        x = tl.load(x_ptr + rows[:, None] * stride_x + h * P + offs_p[None, :],
                    mask=ml[:, None] & mp[None, :], other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + rows * HEADS + h, mask=ml, other=0.0).to(tl.float32)
        bc_mask = ml[:, None] & mn[None, :]
        bt = tl.load(b_ptr + rows[:, None] * stride_bc + g * N + offs_n[None, :], mask=bc_mask,
                     other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + rows[:, None] * stride_bc + g * N + offs_n[None, :], mask=bc_mask,
                     other=0.0).to(tl.float32)
        da = dt * a  # rows past the sequence have dt 0: no decay, no input
        cum = tl.cumsum(da, axis=0)
        total = tl.sum(da, axis=0)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        scores = tl.dot(ct, tl.trans(bt)) * decay * dt[None, :]
        y = tl.dot(scores, x) + tl.dot(ct, tl.trans(s)) * tl.exp(cum)[:, None] + d * x
        tl.store(y_ptr + rows[:, None] * (HEADS * P) + h * P + offs_p[None, :], y,
                 mask=ml[:, None] & mp[None, :])
        weight = tl.exp(total - cum) * dt  # each token's share of the state at the tile's end
        s = s * tl.exp(total) + tl.dot(tl.trans(x * weight[:, None]), bt)
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=s_mask)


@triton.jit
def _conv_prefill_kernel(x_ptr, w_ptr, b_ptr, state_ptr, slots_ptr, seqs_ptr, out_ptr, num_seqs,
                         stride_x, stride_out, C, K: tl.constexpr, KP: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (sequence, block of channels): the causal conv + SiLU of its new rows, the
    K - 1 inputs before them from its state slot (zeros for a first chunk), then the slot set to
    the last K - 1 inputs."""
    seq, cb = tl.program_id(0), tl.program_id(1)
    start = tl.load(seqs_ptr + seq).to(tl.int64)
    n = tl.load(seqs_ptr + num_seqs + seq)
    cached = tl.load(seqs_ptr + 2 * num_seqs + seq)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    state = state_ptr + slot * C * (K - 1) + offs_c * (K - 1)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mt = offs_t < n
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            pos = offs_t - (K - 1) + k  # the input row, counted from the chunk's first
            from_x = mt & (pos >= 0)
            from_state = mt & (pos < 0) & (cached > 0)
            xv = tl.load(x_ptr + (start + pos)[:, None] * stride_x + offs_c[None, :],
                         mask=from_x[:, None] & mc[None, :], other=0.0).to(tl.float32)
            sv = tl.load(state[None, :] + (K - 1 + pos)[:, None],
                         mask=from_state[:, None] & mc[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_c * K + k, mask=mc, other=0.0).to(tl.float32)
            acc += (xv + sv) * w[None, :]
        out = acc * tl.sigmoid(acc)
        tl.store(out_ptr + (start + offs_t)[:, None] * stride_out + offs_c[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mt[:, None] & mc[None, :])
    # the new state: the last K - 1 inputs, read whole before any is written
    j = tl.arange(0, KP)
    pos = n - (K - 1) + j
    mj = j < K - 1
    xv = tl.load(x_ptr + (start + pos)[None, :] * stride_x + offs_c[:, None],
                 mask=mc[:, None] & (mj & (pos >= 0))[None, :], other=0.0)
    sv = tl.load(state[:, None] + (K - 1 + pos)[None, :],
                 mask=mc[:, None] & (mj & (pos < 0) & (cached > 0))[None, :], other=0.0)
    new = xv.to(tl.float32) + sv.to(tl.float32)
    tl.store(state[:, None] + j[None, :], new.to(state_ptr.dtype.element_ty),
             mask=mc[:, None] & mj[None, :])


@triton.jit
def _conv_update_kernel(x_ptr, w_ptr, b_ptr, state_ptr, slots_ptr, out_ptr, stride_x,
                        stride_out, C, K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """One program per (decode row, block of channels): the conv of its one new input after the
    K - 1 in its slot, then the slot shifted by one."""
    row, cb = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    j = tl.arange(0, KP)
    mj = j < K - 1
    state = state_ptr + slot * C * (K - 1) + offs_c[:, None] * (K - 1)
    old = tl.load(state + j[None, :], mask=mc[:, None] & mj[None, :], other=0.0).to(tl.float32)
    later = tl.load(state + j[None, :] + 1, mask=mc[:, None] & (j + 1 < K - 1)[None, :],
                    other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + offs_c, mask=mc, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs_c[:, None] * K + j[None, :], mask=mc[:, None] & mj[None, :],
                other=0.0).to(tl.float32)
    w_new = tl.load(w_ptr + offs_c * K + K - 1, mask=mc, other=0.0).to(tl.float32)
    acc = tl.sum(old * w, axis=1) + x * w_new
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + row * stride_out + offs_c, out.to(out_ptr.dtype.element_ty), mask=mc)
    new = tl.where((j == K - 2)[None, :], x[:, None], later)
    tl.store(state + j[None, :], new.to(state_ptr.dtype.element_ty), mask=mc[:, None] & mj[None, :])


def _conv_shapes(conv_x: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor,
                 out: torch.Tensor) -> tuple[int, int, int]:
    """(channels, K, K - 1 padded to a power of two) of a conv launch, its layouts checked."""
    channels, k = weight.shape
    if conv_x.stride(1) != 1 or out.stride(1) != 1 or not weight.is_contiguous() or \
            not pool.is_contiguous():
        raise ValueError("conv kernels want dense channels, weights and state pool")
    return channels, k, max(2, triton.next_power_of_2(k - 1))


def prefill_states(conv_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   conv_pool: torch.Tensor, slots: torch.Tensor, prefills: torch.Tensor,
                   out: torch.Tensor) -> None:
    """reference_mamba.prefill_states: slots [seqs], prefills int32 [3, seqs] on the device."""
    channels, k, kp = _conv_shapes(conv_x, weight, conv_pool, out)
    seqs, block_c = prefills.shape[1], 64
    grid = (seqs, triton.cdiv(channels, block_c))
    _conv_prefill_kernel[grid](conv_x, weight, bias if bias is not None else weight, conv_pool,
                               slots, prefills.contiguous(), out, seqs, conv_x.stride(0),
                               out.stride(0), channels, k, kp, bias is not None, 32, block_c)


def decode_states(conv_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_pool: torch.Tensor, slots: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """reference_mamba.decode_states: one token per row of conv_x [decodes, channels]."""
    if out is None:
        out = torch.empty(conv_x.shape, dtype=conv_x.dtype, device=conv_x.device)
    channels, k, kp = _conv_shapes(conv_x, weight, conv_pool, out)
    block_c = 128
    grid = (conv_x.shape[0], triton.cdiv(channels, block_c))
    _conv_update_kernel[grid](conv_x, weight, bias if bias is not None else weight, conv_pool,
                              slots, out, conv_x.stride(0), out.stride(0), channels, k, kp,
                              bias is not None, block_c)
    return out


def _check(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, pool: torch.Tensor) -> None:
    """x [T, H, P] and B/C [T, G, N] may be column slices of one buffer (their rows strided),
    each row's heads/groups dense; the pool and the float32 outputs are whole tensors."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2] or B.stride() != C.stride() or \
            B.stride(2) != 1 or B.stride(1) != B.shape[2] or not pool.is_contiguous():
        raise ValueError("ssd kernels want rows of dense heads and a contiguous state pool")


def _blocks(p: int, n: int) -> tuple[int, int]:
    return min(64, max(16, triton.next_power_of_2(p))), max(16, triton.next_power_of_2(n))


def ssd_decode(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor, ssm_pool: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
               dt_limits: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """reference_mamba.ssd_decode: one token per row; the states at `slots` updated in place.
    dt [rows, heads] may be a column slice of the projection's output (rows strided)."""
    _check(x, B, C, ssm_pool)
    rows, heads, p = x.shape
    n = B.shape[2]
    y = out if out is not None else \
        torch.empty(rows, heads, p, dtype=torch.float32, device=x.device)
    if dt.stride(1) != 1 or not y.is_contiguous():
        raise ValueError("ssd_decode wants dt's heads dense and a contiguous output")
    block_p, block_n = _blocks(p, n)
    grid = (rows, heads, triton.cdiv(p, block_p))
    raw = dt_bias is not None
    _ssd_update_kernel[grid](x, dt, A, B, C, D, ssm_pool, slots, y, dt_bias if raw else A,
                             float(dt_limits[0]), min(float(dt_limits[1]), 3.0e38), x.stride(0),
                             B.stride(0), dt.stride(0), heads, heads // B.shape[1], p, n, raw,
                             block_p, block_n)
    return y


@triton.jit
def _gated_norm_kernel(y_ptr, z_ptr, w_ptr, out_ptr, stride_y, stride_z, stride_out, eps,
                       GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row, group): rmsnorm(y * silu(z)) over the group's channels, times the
    weight, stored in out's dtype."""
    row, g = tl.program_id(0), tl.program_id(1)
    offs = g * GROUP + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP
    y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
    h = y * z * tl.sigmoid(z)
    rms = tl.rsqrt(tl.sum(h * h, axis=0) / GROUP + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (h * rms * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """reference_mamba.gated_rms_norm in one launch: y [rows, channels] (float32), z the gate
    (a column slice of the projection may do: rows strided, channels dense); weight's dtype out."""
    rows, channels = y.shape
    if y.stride(1) != 1 or z.stride(1) != 1 or channels % group_size:
        raise ValueError("gated_rms_norm wants dense channels in whole groups")
    out = torch.empty(rows, channels, dtype=weight.dtype, device=y.device)
    _gated_norm_kernel[(rows, channels // group_size)](
        y, z, weight, out, y.stride(0), z.stride(0), out.stride(0), eps, group_size,
        triton.next_power_of_2(group_size))
    return out


def ssd_prefill(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, D: torch.Tensor, chunk_size: int, ssm_pool: torch.Tensor,
                slots: torch.Tensor, prefills: torch.Tensor, y: torch.Tensor) -> None:
    """reference_mamba.ssd_prefill: prefills an int32 [3, seqs] tensor of (first row, new
    tokens, cached tokens), slots [seqs]; y [T, H, P] float32 gets the prefill rows."""
    _check(x, B, C, ssm_pool)
    heads, p = x.shape[1], x.shape[2]
    n = B.shape[2]
    seqs = prefills.shape[1]
    block_p, block_n = _blocks(p, n)
    # a larger state leaves fewer registers for the tile, and wants more warps to hold it
    large = block_n * block_p > 4096
    grid = (seqs, heads, triton.cdiv(p, block_p))
    _ssd_scan_kernel[grid](x, dt.contiguous(), A, B, C, D, ssm_pool, slots, prefills.contiguous(),
                           y, seqs, x.stride(0), B.stride(0), heads, heads // B.shape[1], p, n,
                           32 if large else 64, block_p, block_n, num_warps=8 if large else 4)
