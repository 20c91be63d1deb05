"""Greedy token choice on the GPU: the argmax of each row of logits, first index on ties (as
torch.argmax). torch's argmax runs one block per row: 28 us for a 128k vocabulary on an H100.
Here each row is cut into chunks that reduce in parallel, and the last chunk of a row to finish
picks the best chunk, in the same launch. Logits may be 16-bit (compared exactly as torch compares
their float32 copies). Reference: torch.argmax."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuili.kernels import arrival_counters

CHUNK = 4096
MAX_ROWS = 4096  # rows one launch serves: one arrival counter each


@triton.jit
def _argmax_kernel(x_ptr, val_ptr, idx_ptr, ticket_ptr, out_ptr, also_ptr, V, stride_x, CHUNKS,
                   CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr, ALSO: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf"))
    best = tl.max(x, 0)
    # The first column holding the maximum (the smallest index among ties).
    first = tl.min(tl.where(x == best, cols, V), 0)
    tl.store(val_ptr + row * CHUNKS + chunk, best.to(tl.float32))
    tl.store(idx_ptr + row * CHUNKS + chunk, tl.minimum(first, V - 1))
    # The row's last chunk to arrive picks the best one: every thread's stores above come before
    # the release of the ticket (barrier, then an acq_rel add); it leaves the counter at 0 for the
    # next launch (or graph replay).
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel", scope="gpu") == CHUNKS - 1:
        c = tl.arange(0, CHUNKS_PAD)
        vals = tl.load(val_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
        top = tl.max(vals, 0)
        pick = tl.minimum(tl.min(tl.where(vals == top, c, CHUNKS_PAD), 0), CHUNKS - 1)
        token = tl.load(idx_ptr + row * CHUNKS + pick)
        tl.store(out_ptr + row, token)
        if ALSO:
            tl.store(also_ptr + row, token)
        tl.store(ticket_ptr + row, 0)



def argmax(x: torch.Tensor, also: torch.Tensor | None = None) -> torch.Tensor:
    """x: [rows, V] float or 16-bit, rows contiguous -> [rows] int64 indices of each row's
    maximum, also written to `also` (int64, contiguous) when given. One launch; launches on one
    device must not overlap (they share counters)."""
    rows, V = x.shape
    assert x.stride(1) == 1
    if rows > MAX_ROWS:
        raise ValueError(f"argmax of {rows} rows: at most {MAX_ROWS}")
    out = torch.empty(rows, dtype=torch.long, device=x.device)
    if rows == 0:
        return out
    chunks = triton.cdiv(V, CHUNK)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows, chunks, dtype=torch.long, device=x.device)
    tickets = arrival_counters(x.device, "argmax", MAX_ROWS)
    if also is not None:
        assert also.shape == (rows,) and also.dtype == torch.long and also.is_contiguous()
    _argmax_kernel[(rows, chunks)](x, vals, idx, tickets, out, also if also is not None else out,
                                   V, x.stride(0), chunks, CHUNK=CHUNK,
                                   CHUNKS_PAD=max(16, triton.next_power_of_2(chunks)),
                                   ALSO=also is not None, num_warps=8)
    return out
