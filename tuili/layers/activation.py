import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a merged [gate | up] projection."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
