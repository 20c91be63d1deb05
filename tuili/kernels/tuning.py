"""What the kernels' launch choices depend on: a GPU's multiprocessors, L2 and memory bandwidth.

Decode is a read of the weights, so a kernel's best tiles follow how many bytes each
multiprocessor must keep in flight: its share of the memory bandwidth (bandwidth x latency). An
H200 has an H100's 132 SMs behind 1.44x the bandwidth (36 against 25 GB/s per SM at peak). Alone,
deeper tiles read faster there; inside the decode graph only the small long reductions' did, so
they are all that the class changes today (BENCHMARKS.md, eleventh session).
The traits come from the device's properties (memory clock x bus width), not from its name, so
a card not listed here gets the tiles of the class it falls in.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# Peak read bandwidth per SM above which a GPU takes the fast-memory tiles: between the H100 SXM
# (25.4 GB/s per SM) and the H200 (36.4), the two cards the tiles were measured on.
FAST_MEMORY_BYTES_PER_SM = 30e9


@dataclass(frozen=True)
class GpuTraits:
    name: str
    sms: int
    l2_bytes: int
    peak_bandwidth: float  # bytes/s: 2 transfers a memory clock x bus width (HBM is double-rate)

    @property
    def bandwidth_per_sm(self) -> float:
        return self.peak_bandwidth / self.sms

    @property
    def fast_memory(self) -> bool:
        """Whether each SM must keep more bytes in flight than on an H100 to reach the bandwidth."""
        return self.bandwidth_per_sm >= FAST_MEMORY_BYTES_PER_SM

    @classmethod
    def from_properties(cls, props) -> GpuTraits:
        """From torch.cuda.get_device_properties(i); bandwidth 0 (not fast) where it lacks the
        memory clock and bus width."""
        clock_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        return cls(props.name, props.multi_processor_count, getattr(props, "L2_cache_size", 0),
                   2 * clock_khz * 1e3 * bus_bits / 8)


# The properties torch reports for the two cards the tiles were measured on.
H100 = GpuTraits("NVIDIA H100 80GB HBM3", 132, 50 << 20, 2 * 2619e6 * 5120 / 8)
H200 = GpuTraits("NVIDIA H200", 132, 60 << 20, 2 * 3201e6 * 6016 / 8)


CARDS = {"h100": H100, "h200": H200}


@functools.cache
def _cuda_traits(index: int) -> GpuTraits:
    # TUILI_TUNE_AS=h100|h200: launch shapes chosen as on that card (to compare them on one GPU)
    card = os.environ.get("TUILI_TUNE_AS", "").lower()
    if card:
        if card not in CARDS:
            raise ValueError(f"TUILI_TUNE_AS={card!r}: one of {', '.join(CARDS)}")
        return CARDS[card]
    return GpuTraits.from_properties(torch.cuda.get_device_properties(index))


def gpu_traits(device: torch.device | None = None) -> GpuTraits:
    """The traits of a CUDA device (the current one when None and CUDA is there); H100's for a
    CPU device, where Triton's interpreter runs the kernels shaped as on an H100."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return H100
    return _cuda_traits(device.index if device.index is not None else torch.cuda.current_device())
