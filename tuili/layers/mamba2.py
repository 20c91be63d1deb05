"""The Mamba-2 mixer: in_proj -> (gate z | x, B, C | dt); x, B, C through a causal depthwise conv
(SiLU); the SSD scan with per-head A, dt = clamp(softplus(dt + dt_bias)) and the D skip; a gated
RMSNorm over n_groups groups; out_proj. Checkpoint names follow HF's (in_proj, conv1d, dt_bias,
A_log, D, norm, out_proj).

Each sequence's conv state (the last K - 1 conv inputs) and SSM state live in pools of slots
(conv_state [slots, conv_dim, K - 1], ssm_state [slots, heads, head_dim, state]) that the runner
allocates and binds, as it binds attention's KV cache; the step's metadata names each sequence's
slot. Rows are decodes first (one token each, the one-step update) then prefill chunks (the
chunked scan, from the carried state when cached > 0 else from zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuili.kernels import reference_mamba, triton_module
from tuili.layers.attention import AttentionMetadata
from tuili.layers.backend import Backend
from tuili.layers.linear import Linear
from tuili.models.mamba_config import MambaConfig


class Mamba2Mixer(nn.Module):
    def __init__(self, m: MambaConfig, hidden_size: int, eps: float, backend: Backend):
        super().__init__()
        self.m, self.eps, self.backend = m, eps, backend
        inter, heads = m.intermediate_size, m.num_heads
        self.in_proj = Linear(hidden_size, inter + m.conv_dim + heads, bias=m.proj_bias)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(m.conv_dim, 1, m.conv_kernel),
                                          requires_grad=False)
        self.conv1d.bias = nn.Parameter(torch.zeros(m.conv_dim), requires_grad=False) \
            if m.conv_bias else None
        self.dt_bias = nn.Parameter(torch.zeros(heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(heads), requires_grad=False)
        self.D = nn.Parameter(torch.ones(heads), requires_grad=False)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(inter), requires_grad=False)
        self.out_proj = Linear(inter, hidden_size, bias=m.proj_bias)
        self.conv_state: torch.Tensor | None = None  # bound by the runner
        self.ssm_state: torch.Tensor | None = None
        # The scan's device path, chosen once: Triton's kernels on the GPU, the references on CPU.
        self._scan = triton_module("triton_mamba") if backend.name == "triton" else reference_mamba

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One slot's (conv state, SSM state) shapes."""
        m = self.m
        return (m.conv_dim, m.conv_kernel - 1), (m.num_heads, m.head_dim, m.state_size)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Normed hidden states [tokens, hidden] -> the mixer's output [tokens, hidden]."""
        m, t = self.m, h.shape[0]
        inter, heads, gn = m.intermediate_size, m.num_heads, m.n_groups * m.state_size
        z, xbc, dt = self.backend.linear(h, self.in_proj).split([inter, m.conv_dim, heads], -1)
        conv_pool, ssm_pool, slots, host = self._pools(meta)
        nd, weight, bias = meta.num_decodes, self.conv1d.weight[:, 0, :], self.conv1d.bias
        prefill_slots = host[nd:]
        conv = torch.empty_like(xbc)
        if nd:
            conv[:nd] = reference_mamba.decode_states(xbc[:nd], weight, bias, conv_pool, slots[:nd])
        if meta.prefills:
            conv[nd:] = reference_mamba.prefill_states(
                xbc, weight, bias, conv_pool, prefill_slots, meta.prefills)[nd:]
        x, B, C = conv.split([inter, gn, gn], dim=-1)
        x = x.view(t, heads, m.head_dim)
        B, C = B.view(t, m.n_groups, m.state_size), C.view(t, m.n_groups, m.state_size)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(m.dt_min, m.dt_max)
        A = -torch.exp(self.A_log.float())
        y = torch.empty(t, heads, m.head_dim, dtype=torch.float32, device=h.device)
        if nd:
            y[:nd] = self._scan.ssd_decode(x[:nd], dt[:nd], A, B[:nd], C[:nd], self.D, ssm_pool,
                                           slots[:nd])
        if meta.prefills:
            self._scan.ssd_prefill(x, dt, A, B, C, self.D, m.chunk_size, ssm_pool,
                                   self._prefill_slots(meta, slots, prefill_slots),
                                   self._prefills(meta), y)
        out = reference_mamba.gated_rms_norm(y.view(t, inter), z, self.norm.weight, self.eps,
                                             inter // m.n_groups)
        return self.backend.linear(out.to(h.dtype), self.out_proj)

    def _pools(self, meta: AttentionMetadata):
        """(conv pool, SSM pool, each sequence's slot [seqs], the same as host ints): the bound
        pools, or (a start-up measurement's step, none bound) scratch ones, a slot a sequence."""
        if self.conv_state is not None and meta.state_slots is not None:
            return self.conv_state, self.ssm_state, meta.state_slots, meta.state_slot_list
        seqs = meta.num_decodes + len(meta.prefills)
        device, dtype = self.D.device, self.in_proj.weight.dtype
        conv, ssm = self.state_shapes()
        return (torch.zeros(seqs, *conv, dtype=dtype, device=device),
                torch.zeros(seqs, *ssm, dtype=dtype, device=device),
                torch.arange(seqs, device=device), list(range(seqs)))

    def _prefill_slots(self, meta: AttentionMetadata, slots: torch.Tensor, host: list[int]):
        """The prefill sequences' slots as the scan wants them: a device tensor for Triton's
        kernel, host ints for the references."""
        return slots[meta.num_decodes:] if self._scan is not reference_mamba else host

    def _prefills(self, meta: AttentionMetadata):
        """(first row, new tokens, cached tokens) per prefill: the [3, prefills] int32 device
        tensor for Triton's kernel, the host list for the references."""
        if self._scan is reference_mamba:
            return meta.prefills
        if meta.prefill_seqs is not None:
            return meta.prefill_seqs
        return torch.tensor(list(zip(*meta.prefills)), dtype=torch.int32, device=self.D.device)
