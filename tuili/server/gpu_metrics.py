"""GPU utilization and memory for /metrics: NVML (`nvidia-ml-py`) where it loads, torch's memory
counters otherwise, nothing on a machine without a GPU. A scrape never fails because of a GPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("tuili")

UTILIZATION = "tuili:gpu_utilization_perc"
MEMORY_USED = "tuili:gpu_memory_used_bytes"
MEMORY_TOTAL = "tuili:gpu_memory_total_bytes"
MEMORY_RESERVED = "tuili:gpu_memory_reserved_bytes"
METRIC_NAMES = (UTILIZATION, MEMORY_USED, MEMORY_TOTAL, MEMORY_RESERVED)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one scrape; None where the source cannot tell."""
    gpu: int  # the CUDA index this process sees
    utilization: float | None  # share of the last sample period a kernel ran (0..1), NVML only
    memory_used: int | None  # bytes in use on the device, by every process
    memory_total: int | None
    memory_reserved: int | None  # bytes held by this process's torch allocator


class NvmlReader:
    """The visible GPUs through NVML; `open()` gives None where NVML or its driver is missing."""

    def __init__(self, nvml, handles: list):
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls) -> NvmlReader | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:  # no driver's library: a CPU machine
            log.info("GPU metrics: NVML unavailable (%s)", e)
            return None
        try:
            handles = _visible_handles(pynvml)
        except pynvml.NVMLError as e:  # a listed device NVML does not know
            log.info("GPU metrics: NVML unavailable (%s)", e)
            handles = []
        if not handles:
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handles)

    def read(self) -> list[GpuReading]:
        out = []
        for gpu, h in enumerate(self.handles):
            util = mem = None
            try:
                util = self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            except self.nvml.NVMLError:
                pass  # some boards do not report it; memory still does
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            except self.nvml.NVMLError:
                pass
            out.append(GpuReading(gpu, util, mem.used if mem else None,
                                  mem.total if mem else None, _torch_reserved(gpu)))
        return out


def _visible_handles(nvml) -> list:
    """NVML handles in CUDA's order: CUDA_VISIBLE_DEVICES' list (indices or UUIDs, up to the first
    entry CUDA would stop at), else every device NVML sees (in PCI order, as
    CUDA_DEVICE_ORDER=PCI_BUS_ID numbers them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
        elif entry.startswith("GPU-"):
            handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
        else:  # empty, -1, or a MIG slice (NVML has no utilization for those): torch's counters
            break
    return handles


def _torch_reserved(gpu: int) -> int | None:
    """This process's torch allocator on `gpu`, if torch has started CUDA (never starts it)."""
    import torch

    if not torch.cuda.is_initialized() or gpu >= torch.cuda.device_count():
        return None
    return torch.cuda.memory_reserved(gpu)


def torch_readings() -> list[GpuReading]:
    """Memory of the GPUs this process's torch works on; no utilization (it needs NVML)."""
    import torch

    if not torch.cuda.is_initialized():
        return []  # CPU, or CUDA not started: asking would create a context
    out = []
    for gpu in range(torch.cuda.device_count()):
        reserved = torch.cuda.memory_reserved(gpu)
        if reserved == 0 and gpu != torch.cuda.current_device():
            continue  # no context of ours there; cudaMemGetInfo would create one
        free, total = torch.cuda.mem_get_info(gpu)
        out.append(GpuReading(gpu, None, total - free, total, reserved))
    return out


def gpu_readings_source() -> Callable[[], list[GpuReading]]:
    """The best source this machine has, chosen once: NVML, else torch's counters."""
    nvml = NvmlReader.open()
    return nvml.read if nvml is not None else torch_readings


class GpuCollector:
    """Prometheus gauges per GPU (label `gpu`); no samples at all where there is no GPU."""

    def __init__(self, readings: Callable[[], list[GpuReading]]):
        self.readings = readings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            readings = self.readings()
        except Exception as e:  # noqa: BLE001 - a GPU that fell off the bus must not fail /metrics
            log.warning("GPU metrics: reading failed (%s: %s)", type(e).__name__, e)
            return
        if not readings:
            return
        for name, doc, field in (
                (UTILIZATION, "Share of the last sample period a kernel ran on the GPU (NVML).",
                 "utilization"),
                (MEMORY_USED, "GPU memory in use by all processes, bytes.", "memory_used"),
                (MEMORY_TOTAL, "GPU memory in all, bytes.", "memory_total"),
                (MEMORY_RESERVED, "GPU memory held by this process's torch allocator, bytes.",
                 "memory_reserved")):
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            for r in readings:
                value = getattr(r, field)
                if value is not None:
                    family.add_metric([str(r.gpu)], float(value))
            if family.samples:
                yield family
