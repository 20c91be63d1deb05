"""A tensor-parallel group: this process's rank among N, the collectives the parallel layers call,
and a gloo group beside it for host data (the steps' inputs, the KV-cache size agreement)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks 1..N-1 wait for rank 0's next step for as long as the engine idles: their control
# group's timeout is long; the model's collectives keep the short one (a dead rank's error).
IDLE_TIMEOUT = timedelta(days=30)
STOP_KEY = "tuili/stop"


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object = None  # the model's collectives (NCCL on GPU, gloo on CPU)
    cpu_group: object = None  # gloo: step inputs and other host data
    store: object = None  # the rendezvous store (rank 0 hosts it): the stop flag below

    def announce_stop(self, why: str) -> None:
        """Rank 0: tell every rank to leave, past any collective it waits in (a rank died, so
        the group's collectives cannot end the others' waits)."""
        if self.store is not None:
            try:
                self.store.set(STOP_KEY, why)
            except Exception:  # the store is gone too: the ranks see that instead
                pass

    def stop_announced(self) -> bool:
        """Ranks 1..N-1: whether rank 0 said stop, or its store is gone (rank 0 died)."""
        try:
            return self.store.check([STOP_KEY])
        except Exception:
            return True

    @property
    def first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (NCCL's is graph-capturable)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise largest over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's [rows, n] side by side: [rows, size * n]."""
        if self.size == 1:
            return x
        rows = x.shape[0]
        out = torch.empty((self.size * rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous(), group=self.group)
        return out.view(self.size, rows, -1).transpose(0, 1).reshape(rows, -1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (each rank sizes its KV cache from its own memory;
        the scheduler's block ids must exist on all)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def shard(self, n: int, what: str) -> int:
        """n split evenly over the ranks; an error naming `what` where it does not split."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) does not split over tensor_parallel_size={self.size}; "
                             f"choose a size that divides it")
        return n // self.size


SINGLE = TensorParallel()
# torch 2.13 renamed it (the old name warns); the GPU machine's 2.11 has only the old one.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def rank_threads(size: int) -> int:
    """CPU threads for one of `size` ranks on this host: its share of the cores (more, and the
    ranks' OpenMP threads spin against each other)."""
    return max(1, (os.cpu_count() or 1) // size)


def init_group(rank: int, size: int, device: torch.device, timeout_s: float,
               master_addr: str | None = None, master_port: int | None = None) -> TensorParallel:
    """Join the group of `size` ranks at MASTER_ADDR:MASTER_PORT (given, or from the environment
    as torchrun and LeaderWorkerSet set them): NCCL for a CUDA device, gloo otherwise."""
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ.get("MASTER_PORT", "29500"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, size, is_master=rank == 0, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    cpu_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    tp = TensorParallel(rank, size, dist.group.WORLD, cpu_group, store)
    # NCCL's communicator comes up on the first collective: before any CUDA graph capture.
    tp.all_reduce(torch.zeros(1, device=device))
    return tp
