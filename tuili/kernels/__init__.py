"""Kernels. `reference` holds the plain-torch version of each: the CPU path and the test oracle.
The Triton modules serve CUDA tensors where Triton is installed (layers/backend.py picks them once
per model): `triton_attention` (paged decode and prefill attention, the K/V store), `triton_rope`
(rotary, with q/k norms, and the K/V store), `triton_fused` (RMSNorm with the residual add,
SiLU-and-mul), `triton_gemv` (decode GEMVs with norm, SiLU and residual fused) and
`triton_sampling` (argmax, and sampling by a Gumbel-max race); `tuning` holds the GPU traits
their launch shapes are chosen by."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def on_gpu(t: torch.Tensor) -> bool:
    """Whether t should go through the Triton kernels (for code outside the layers, which ask
    their backend)."""
    return t.is_cuda and HAS_TRITON


def triton_module(name: str):
    """A Triton kernel module, imported on first use (CPU builds of torch have no Triton)."""
    return importlib.import_module(f"tuili.kernels.{name}")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (an H100's 132 for a CPU one: under Triton's
    interpreter, TRITON_INTERPRET=1, the kernels run on CPU tensors, launches shaped as there)."""
    from tuili.kernels.tuning import gpu_traits

    return gpu_traits(device).sms


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch (Hopper and later):
    a kernel's programs start while the one before it drains, stream in what depends on nothing
    earlier (weights), then wait for it (`gdc_wait`). TUILI_PDL=0 turns it off."""
    return t.is_cuda and _pdl_on(_index(t.device))


@functools.cache
def _pdl_on(device_index: int) -> bool:
    return (os.environ.get("TUILI_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


@functools.cache
def arrival_counters(device: torch.device, kernel: str, size: int = 4096) -> torch.Tensor:
    """Zeroed int32 counters for `kernel`'s programs to take arrival tickets from (the last to
    arrive finishes the work and sets its counter back to 0), one buffer per kernel and device,
    so launches of one kernel on one device must not overlap. Allocated on first use, which must
    come before a CUDA graph captures the kernel."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{kernel} must run once before a CUDA graph captures it (its "
                           "counters are allocated and zeroed on first use)")
    return torch.zeros(size, dtype=torch.int32, device=device)
