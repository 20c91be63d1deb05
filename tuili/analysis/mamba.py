"""A hybrid's Mamba-2 mixer layers in the roofline and the memory planner: their parameters, the
fixed recurrent state each sequence keeps (in place of K/V), and the mixer's operators of a step
(its projections, and the conv + SSD scan + gated norm, which read and write each sequence's
state once per layer)."""

from __future__ import annotations

from tuili.models.config import ModelConfig


def mixer_layers(c: ModelConfig) -> int:
    return len(c.mamba.layers) if c.mamba else 0


def attention_windows(c: ModelConfig) -> list[int]:
    """The sliding window (0: none) of each layer that attends (a mixer layer keeps no K/V)."""
    mixers = set(c.mamba.layers) if c.mamba else set()
    return [w for i, w in enumerate(c.windows()) if i not in mixers]


def projection_sizes(c: ModelConfig) -> tuple[int, int]:
    """(in_proj outputs, out_proj inputs) of one mixer: in_proj gives the gate z, x, B, C and dt."""
    m = c.mamba
    return m.intermediate_size + m.conv_dim + m.num_heads, m.intermediate_size


def mixer_params(c: ModelConfig) -> int:
    """Parameters of all mixer layers: the projections, the conv, dt_bias, A, D and the norm."""
    if not c.mamba:
        return 0
    m, (n_in, n_out) = c.mamba, projection_sizes(c)
    per_layer = (c.hidden_size * n_in + n_out * c.hidden_size + m.conv_dim * m.conv_kernel
                 + (m.conv_dim if m.conv_bias else 0) + 3 * m.num_heads + m.intermediate_size)
    return per_layer * mixer_layers(c)


def state_bytes_per_seq(c: ModelConfig, state_bytes: float) -> float:
    """Every mixer layer's conv and SSM state of one sequence, `state_bytes` per element."""
    if not c.mamba:
        return 0.0
    return sum(c.mamba.state_elements()) * mixer_layers(c) * state_bytes


def scan_step(c: ModelConfig, seqs: list[tuple[int, int]], state_bytes: float,
              act_bytes: int) -> tuple[float, float, float]:
    """(FLOPs, bytes read, bytes written) of the conv, the scan and the gated norm of all mixer
    layers, for (new_tokens, context) pairs. A token's conv costs 2 K per channel; the scan, per
    head row of head_dim and state N: a decode token updates and reads the state (~6 P N), a
    prefill token also meets the tokens before it in its chunk (C.B over N and the sum over P,
    half a chunk on average) and the state at the chunk's start (~4 P N). Each sequence's state
    is read and written once a layer; the activations in (x, B, C, dt, z) and out once."""
    m, layers = c.mamba, mixer_layers(c)
    h, p, n, g = m.num_heads, m.head_dim, m.state_size, m.n_groups
    flops = read = written = 0.0
    for new, _ in seqs:
        reach = min(new, m.chunk_size) / 2
        scan = 6 * h * p * n if new == 1 else h * (4 * p * n + 2 * reach * (n * g / h + p))
        flops += new * (2 * m.conv_dim * m.conv_kernel + scan + 6 * m.intermediate_size)
        state = sum(m.state_elements()) * state_bytes
        read += state + new * (m.conv_dim + m.intermediate_size + h) * act_bytes
        written += state + new * m.intermediate_size * act_bytes
    return flops * layers, read * layers, written * layers
