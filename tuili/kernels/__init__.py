"""Kernels. `reference` holds the plain-torch version of each: the CPU path and the test oracle.
The Triton modules (`triton_attention`, `triton_fused`) serve CUDA tensors when Triton is there."""

from __future__ import annotations

import importlib
import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def on_gpu(t: torch.Tensor) -> bool:
    """Whether t should go through the Triton kernels."""
    return t.is_cuda and HAS_TRITON


def triton_module(name: str):
    """A Triton kernel module, imported on first use (CPU builds of torch have no Triton)."""
    return importlib.import_module(f"tuili.kernels.{name}")
