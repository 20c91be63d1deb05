"""MambaConfig: the Mamba-2 mixer layers of a hybrid decoder (granite-4.0-h) and their state."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MambaConfig:
    layers: list[int]  # the mixer layers' indices; the others attend
    num_heads: int
    head_dim: int
    state_size: int  # N: the SSM state's width per head row
    n_groups: int  # B and C are shared by num_heads / n_groups heads each
    conv_kernel: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.0  # dt's clamp after softplus(dt + dt_bias) (time_step_limit)
    dt_max: float = float("inf")

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: x, B and C."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def state_elements(self) -> tuple[int, int]:
        """(conv state, SSM state) elements of one sequence in one mixer layer."""
        return (self.conv_dim * (self.conv_kernel - 1),
                self.num_heads * self.head_dim * self.state_size)

    def __post_init__(self):
        if self.num_heads % self.n_groups:
            raise ValueError(f"mamba_n_groups ({self.n_groups}) must divide mamba_n_heads "
                             f"({self.num_heads})")
        if self.conv_kernel < 2:
            raise ValueError(f"mamba_d_conv is {self.conv_kernel}, must be >= 2")
