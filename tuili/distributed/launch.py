"""Rank 0's side of tensor parallelism: start ranks 1..N-1 (spawned here, or already started by
torchrun / a LeaderWorkerSet from MASTER_ADDR, RANK, WORLD_SIZE), join their group, and watch them:
a rank that dies makes the next step raise RankFailure instead of waiting on it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import asdict

import torch
import torch.distributed as dist

from tuili.config import EngineConfig
from tuili.distributed.channel import StepChannel
from tuili.distributed.group import TensorParallel, init_group
from tuili.errors import RankFailure

log = logging.getLogger("tuili")


def env_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) where a launcher set them, else None (this process spawns the rest)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank of this host (LOCAL_RANK where a launcher set it)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """The tensor-parallel group as rank 0 holds it: its TensorParallel, the step channel, and
    the ranks it spawned."""

    def __init__(self, config: EngineConfig, device: torch.device):
        size = config.tensor_parallel_size
        self.procs: list[subprocess.Popen] = []
        self.failure: str | None = None
        self._stopping = False
        if dist.is_initialized():
            raise RankFailure("this process already holds a tensor-parallel group (another "
                              "engine's); shut that engine down first (engine.shutdown())")
        launched = env_rank()
        addr = port = None
        if launched is None:
            addr, port = "127.0.0.1", _free_port()
            # A fresh interpreter per rank, not multiprocessing's spawn: that re-runs the user's
            # main script, which then must guard itself with `if __name__ == "__main__"`.
            options = json.dumps(asdict(config))
            for rank in range(1, size):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tuili.distributed.worker", options, str(rank), addr,
                     str(port)]))
        elif launched != (0, size):
            raise RankFailure(f"this process is RANK={launched[0]} of WORLD_SIZE={launched[1]}; "
                              f"rank 0 of tensor_parallel_size={size} runs the engine")
        try:
            self.tp: TensorParallel = init_group(0, size, device, config.distributed_timeout_s,
                                                 addr, port)
        except Exception as e:
            self.abort()
            raise RankFailure(f"the tensor-parallel group of {size} did not form: {e}") from e
        self.channel = StepChannel(self.tp, device)
        for rank, proc in enumerate(self.procs, 1):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"tuili-tp-watch{rank}",
                             daemon=True).start()

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        """Wait for a spawned rank to exit; while the engine runs, that is a failure."""
        code = proc.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if self.failure is None and not self._stopping:
            self.failure = f"tensor-parallel rank {rank} (pid {proc.pid}) {how}; the engine stopped"
            log.error(self.failure)

    def check(self) -> None:
        """Raise RankFailure if a rank is gone (before a step would wait on it)."""
        if self.failure is not None:
            self.tp.announce_stop(self.failure)
            raise RankFailure(self.failure)

    def failed(self, error: Exception) -> RankFailure:
        """A collective's error as the RankFailure it means, naming the dead rank if known; the
        ranks still alive are told to stop."""
        self.failure = self.failure or f"a tensor-parallel collective failed ({error}); the " \
                                       "engine stopped"
        self.tp.announce_stop(self.failure)
        return RankFailure(self.failure)

    def execute(self, runner, batch, pending):
        """runner.execute(batch, pending), its collectives' failures raised as RankFailure."""
        self.check()
        try:
            return runner.execute(batch, pending)
        except RankFailure:
            raise
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.failed(e) from e

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell the other ranks to stop, wait for them, leave the group."""
        self._stopping = True
        if self.failure is None:
            try:
                self.channel.stop()
            except Exception:  # a rank already gone: nothing to tell
                pass
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.abort()

    def abort(self) -> None:
        """Kill the ranks spawned here and leave the group (start-up failed, or a rank died)."""
        self._stopping = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
