"""Host <-> device copies that never make the CPU wait for the GPU's queued work.

`torch.tensor(values, device="cuda")` copies synchronously: the CPU stalls until everything queued
on the stream has run. Steps are pipelined (the next one is prepared while the GPU computes this
one), so every copy in the engine goes through here instead.
"""

from __future__ import annotations

import functools
from array import array
from itertools import chain

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (nested lists, or an array.array of dtype) as a tensor on `device`, copied
    without a stream sync. From pageable memory the driver stages the bytes before returning, so
    the host tensor may go at once; on the H100 this beat staging through pinned memory
    (BENCHMARKS.md has the A/B)."""
    host = _host_tensor(values, dtype)
    if device.type != "cuda":
        return host
    return host.to(device, non_blocking=True)


def upload(dst: torch.Tensor, values) -> None:
    """dst.copy_(values) for host values (as to_device takes them) of dst's shape, copied as
    to_device copies but straight into dst: no stream sync, no device temporary to copy again."""
    dst.copy_(_host_tensor(values, dst.dtype).view(dst.shape), non_blocking=True)


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i"}


def _host_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    # A flat list of ints goes through array.array: about 4x faster than torch.tensor's loop,
    # which matters for the thousands of ids, positions and slots of a long prompt.
    code = _ARRAY_CODES.get(dtype)
    if code and isinstance(values, list) and values:
        if type(values[0]) is int:
            values = array(code, values)
        elif type(values[0]) is list and values[0] and type(values[0][0]) is int:
            # Rows of one width (block tables, graph inputs): flattened the same way, not
            # through torch.tensor's slow nested loop.
            flat = array(code, chain.from_iterable(values))
            if len(flat) == len(values) * len(values[0]):
                return torch.frombuffer(flat, dtype=dtype).view(len(values), -1)
    if isinstance(values, array):
        return torch.frombuffer(values, dtype=dtype) if values else torch.zeros(0, dtype=dtype)
    return torch.tensor(values, dtype=dtype)


class HostCopy:
    """A device tensor's copy on the host, started now and waited for on first use.

    The copy runs on a stream of its own, after the work queued so far: the next step's uploads
    and kernels, queued behind it on the main stream, need not wait for it. A kernel that will
    overwrite the tensor in place (a CUDA graph's static output) must come after
    `readbacks_done`; memory from the allocator is held until the copy is done."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.is_cuda:
            side = _readback_stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(side):
                self.host = tensor.to("cpu", non_blocking=True)  # into pinned memory
                self.event = torch.cuda.Event()
                self.event.record(side)
            tensor.record_stream(side)
        else:
            self.host = tensor

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host


@functools.cache
def _readback_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def readbacks_done(device: torch.device) -> None:
    """Make the current stream's next work wait for the host copies started so far on device."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(_readback_stream(device))


def copy_rows(dst: torch.Tensor, dst_rows: list[int], src: torch.Tensor, src_rows: list[int]) -> None:
    """dst[dst_rows] = src[src_rows] on the device (a plain slice copy when both are 0..n-1)."""
    n = len(dst_rows)
    if dst_rows == src_rows == list(range(n)):
        dst[:n].copy_(src[:n])
        return
    index = to_device([dst_rows, src_rows], torch.long, dst.device)
    dst.index_copy_(0, index[0], src.index_select(0, index[1]))
