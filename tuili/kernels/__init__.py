"""Kernels. `reference` holds the plain-torch version of each: the CPU path and the test oracle.
The Triton modules (`triton_attention`, `triton_fused`, `triton_gemv`, `triton_rope`,
`triton_sampling`) serve CUDA tensors when Triton is there; `tuning` holds the GPU traits their
launch shapes are chosen by."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def on_gpu(t: torch.Tensor) -> bool:
    """Whether t should go through the Triton kernels."""
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


def rope_in_qkv() -> bool:
    """Whether a decode GEMV of a QKV projection also applies rotary and stores K/V in its epilogue
    (triton_gemv.RopeStore), so that no kernel runs between it and attention: TUILI_QKV_ROPE=1.
    Off by default: in decode graphs on an H100 it saved nothing over the rope kernel, which PDL
    already overlaps with the projection's tail (BENCHMARKS.md, sixth session). Read at each call:
    graphs captured after a change follow it."""
    return os.environ.get("TUILI_QKV_ROPE", "0") == "1"


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
