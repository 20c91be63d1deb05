import torch

from tuili.kernels import on_gpu, reference, triton_module


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a merged [gate | up] projection."""
    if on_gpu(x):
        return triton_module("triton_fused").silu_and_mul(x)
    return reference.silu_and_mul(x)
