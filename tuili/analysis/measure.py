"""A device's ceilings by name or for a torch device: a spec sheet's (devices.py), or, for
`--device measure` and unknown devices, this machine's copy bandwidth and matmul rate, measured in
a second or two."""

from __future__ import annotations

import functools
import os
import re
import time

import torch

from tuili.analysis.devices import DEVICES, Device
from tuili.errors import InvalidParameter


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, size_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of the better of a full reduction (reads the buffer) and a copy (reads and writes),
    over a buffer far larger than the caches."""
    if size_bytes is None:
        size_bytes = 2 * 2**30 if device.type == "cuda" else 2**30  # past large server L3s
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read = size_bytes / _best_seconds(lambda: src.sum(), device, repeats)
    copy = 2 * size_bytes / _best_seconds(lambda: dst.copy_(src), device, repeats)
    return max(read, copy)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None,
                repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ b, device, repeats)


def memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[1])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@functools.lru_cache(maxsize=4)
def _measure(device_str: str) -> Device:
    device = torch.device(device_str)
    with torch.inference_mode():
        bandwidth = copy_bandwidth(device)
        flops = {"fp32": matmul_rate(device, torch.float32),
                 "bf16": matmul_rate(device, torch.bfloat16)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return Device(f"{name} (measured here)", bandwidth, flops, memory_bytes(device),
                  note=f"{torch.get_num_threads()} threads" if device.type == "cpu" else "")


def measure_device(device: torch.device | str | None = None) -> Device:
    """Measured ceilings of `device` (default: cuda if present, else cpu); cached per process."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _measure(str(torch.device(device)))


# Words in torch.cuda.get_device_name() -> our spec sheet ("L4" as a word: not L40S).
_CUDA_NAMES = ((r"H200", "h200"), (r"H100", "h100"), (r"A100", "a100"), (r"4090", "rtx4090"),
               (r"\bL4\b", "l4"))


def get_device(name: str) -> Device:
    """A spec-sheet device by name (h100, h200, a100, rtx4090, l4, cpu); `measure` measures here."""
    if name == "measure":
        return measure_device()
    try:
        return DEVICES[name]
    except KeyError:
        raise InvalidParameter("device", f"got {name!r}, must be one of "
                               f"{', '.join([*DEVICES, 'measure'])}") from None


def for_torch_device(device) -> Device:
    """The ceilings of the device an engine runs on: its spec sheet for a known GPU, else measured."""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for pattern, key in _CUDA_NAMES:
            if re.search(pattern, gpu):
                return DEVICES[key]
    return measure_device(device)
