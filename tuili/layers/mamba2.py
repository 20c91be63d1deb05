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
        self.conv_snapshots: torch.Tensor | None = None  # the prefix cache's (with prefix caching)
        self.ssm_snapshots: torch.Tensor | None = None
        # The conv's and scan's device path, chosen once: Triton's kernels on the GPU, the
        # references on CPU.
        self._kernels = triton_module("triton_mamba") if backend.name == "triton" \
            else reference_mamba
        self._A: torch.Tensor | None = None  # -exp(A_log): _decay()

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
        phases, saved = self._phases(meta, host[nd:]) if meta.prefills else ([], None)
        kernels, conv = self._kernels, torch.empty_like(xbc)
        if nd:
            kernels.decode_states(xbc[:nd], weight, bias, conv_pool, slots[:nd], out=conv[:nd])
        args = [self._kernel_args(meta, slots, *phase, whole=i == 0 and not saved)
                for i, phase in enumerate(phases)]
        for i, (phase_slots, prefills) in enumerate(args):
            kernels.prefill_states(xbc, weight, bias, conv_pool, phase_slots, prefills, conv)
            if i == 0 and saved:
                self._snapshot(conv_pool, self.conv_snapshots, saved)
        x, B, C = conv.split([inter, gn, gn], dim=-1)
        x = x.view(t, heads, m.head_dim)
        B, C = B.view(t, m.n_groups, m.state_size), C.view(t, m.n_groups, m.state_size)
        A, limits = self._decay(), (m.dt_min, m.dt_max)
        y = torch.empty(t, heads, m.head_dim, dtype=torch.float32, device=h.device)
        if nd:  # the decodes' step sizes are taken inside the update
            kernels.ssd_decode(x[:nd], dt[:nd], A, B[:nd], C[:nd], self.D, ssm_pool, slots[:nd],
                               out=y[:nd], dt_bias=self.dt_bias, dt_limits=limits)
        if args:
            dt = reference_mamba.step_dt(dt, self.dt_bias, limits)
        for i, (phase_slots, prefills) in enumerate(args):
            kernels.ssd_prefill(x, dt, A, B, C, self.D, m.chunk_size, ssm_pool, phase_slots,
                                prefills, y)
            if i == 0 and saved:
                self._snapshot(ssm_pool, self.ssm_snapshots, saved)
        out = kernels.gated_rms_norm(y.view(t, inter), z, self.norm.weight, self.eps,
                                     inter // m.n_groups)
        return self.backend.linear(out.to(h.dtype), self.out_proj)

    def _decay(self) -> torch.Tensor:
        """A = -exp(A_log) per head (float32), taken once the weights are in: the first step
        runs before any CUDA graph is captured (start-up's measuring step)."""
        if self._A is None or self._A.device != self.A_log.device:
            self._A = -torch.exp(self.A_log.float())
        return self._A

    def _phases(self, meta: AttentionMetadata, slots: list[int]):
        """The prefills in one phase, or (when some states are snapshotted part-way through a
        chunk, a prefix-cache point) two: each saving sequence's rows up to its point, the rest
        whole; then its remaining rows from the state left there. Returns ([(prefills, slots)],
        (slots, snapshots) to copy between the phases or None)."""
        saves = {seq - meta.num_decodes: (k, snap) for seq, k, snap in meta.state_saves or ()}
        if not saves:
            return [(meta.prefills, slots)], None
        first, rest, rest_slots = [], [], []
        for i, ((start, n, cached), slot) in enumerate(zip(meta.prefills, slots)):
            k = saves[i][0] if i in saves else n
            first.append((start, k, cached))
            if k < n:
                rest.append((start + k, n - k, cached + k))
                rest_slots.append(slot)
        phases = [(first, slots)] + ([(rest, rest_slots)] if rest else [])
        return phases, ([slots[i] for i in saves], [snap for _, snap in saves.values()])

    def _snapshot(self, pool: torch.Tensor, snapshots: torch.Tensor, saved) -> None:
        device = pool.device
        slots, snaps = (torch.tensor(v, device=device) for v in saved)
        snapshots.index_copy_(0, snaps, pool.index_select(0, slots))

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

    def _kernel_args(self, meta: AttentionMetadata, slots: torch.Tensor, prefills, phase_slots,
                     whole: bool):
        """(slots, prefills) of a phase as the kernels want them: host lists for the
        references; for Triton's device tensors (slots [seqs], prefills int32 [3, seqs]), the
        step's own when the phase is its whole prefill."""
        if self._kernels is reference_mamba:
            return phase_slots, prefills
        device = self.D.device
        if whole:
            seqs = meta.prefill_seqs
            if seqs is None:
                seqs = torch.tensor(list(zip(*prefills)), dtype=torch.int32, device=device)
            return slots[meta.num_decodes:], seqs
        return (torch.tensor(phase_slots, device=device),
                torch.tensor(list(zip(*prefills)), dtype=torch.int32, device=device))
