"""Ranks 1..N-1: load this rank's shard, size its KV cache, then run every step rank 0 sends
(the same ModelRunner.run, so the same collectives in the same order) until it says stop."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import torch

from tuili.config import EngineConfig
from tuili.distributed.channel import StepChannel
from tuili.distributed.group import init_group, rank_threads
from tuili.distributed.launch import env_rank, rank_device

log = logging.getLogger("tuili")


def spawned_rank_main(config: EngineConfig, rank: int, addr: str, port: int) -> None:
    """The entry of a rank that rank 0 spawned (distributed/launch.py): it ends when its parent
    does."""
    parent = os.getppid()

    def watch_parent() -> None:  # a parent killed outright leaves no one to say stop
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    code = run_rank(config, rank, addr, port)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not through the group's teardown, which would wait on the other ranks


def launched_rank_main(config: EngineConfig) -> int:
    """The entry of a rank > 0 that a launcher (torchrun, LeaderWorkerSet) started with RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT: the same loop as a spawned rank's."""
    rank, world = env_rank()
    if world != config.tensor_parallel_size:
        raise SystemExit(f"WORLD_SIZE={world} but tensor_parallel_size="
                         f"{config.tensor_parallel_size}; they must be equal")
    return run_rank(config, rank)


def run_rank(config: EngineConfig, rank: int, addr: str | None = None,
             port: int | None = None) -> int:
    """Join the group, build this rank's runner, serve steps; the exit code."""
    from tuili.engine.engine import device_defaults, pick_device, pick_dtype
    from tuili.engine.memory import plan_kv_cache
    from tuili.engine.pooling_setup import choose_task
    from tuili.engine.runner import ModelRunner
    from tuili.kernels import HAS_TRITON
    from tuili.layers import kv_quant
    from tuili.models import loader

    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(message)s")
    device = rank_device(pick_device(config.device), rank)
    if device.type == "cpu":
        torch.set_num_threads(config.num_threads or rank_threads(config.tensor_parallel_size))
    config = device_defaults(config, device)
    tp = init_group(rank, config.tensor_parallel_size, device, config.distributed_timeout_s,
                    addr, port)
    dtype = pick_dtype(config.dtype, device)
    # The same calls as LLMEngine.__init__, in its order: each may run collectives.
    loaded = loader.load(config.model, dtype, device, config.revision, config.quantization,
                         config.quantize_lm_head, tp)
    _, _, config = choose_task(config, loaded)
    eager = config.enforce_eager or not HAS_TRITON or device.type != "cuda"
    prefill_graph_tokens = 0 if eager else min(config.max_prefill_graph_tokens,
                                               config.max_num_batched_tokens)
    kv_dtype = kv_quant.cache_dtype(config.kv_cache_dtype, dtype)
    num_blocks, max_model_len = plan_kv_cache(config, loaded.config, loaded.model, dtype, device,
                                              prefill_graph_tokens, tp, kv_dtype)
    kv_scales = None
    if kv_dtype != dtype:  # an FP8 cache: calibration (if any) runs the model's collectives
        kv_scales = kv_quant.prepare_scales(loaded.model, loaded.config, loaded.kv_scales,
                                            loaded.tokenizer.encode, dtype, device, tp)
    runner = ModelRunner(loaded.model, loaded.config, num_blocks, config.block_size,
                         max_model_len, dtype, device, 0 if eager else config.max_num_seqs,
                         prefill_graph_tokens, kv_dtype=kv_dtype, kv_scales=kv_scales)
    channel = StepChannel(tp, device)
    threading.Thread(target=_watch_stop, args=(tp, rank), daemon=True).start()
    try:
        while (step := channel.receive()) is not None:
            runner.run(*step)
    except Exception as e:  # rank 0 gone, or a collective timed out: nothing left to serve
        log.error("tensor-parallel rank %d stops: %s", rank, e)
        return 1
    return 0


def _watch_stop(tp, rank: int, every_s: float = 1.0) -> None:
    """Leave once rank 0 says stop (another rank died: the collective this rank waits in may
    never end) or its rendezvous store is gone (rank 0 died)."""
    while not tp.stop_announced():
        time.sleep(every_s)
    log.error("tensor-parallel rank %d stops: rank 0 stopped the group", rank)
    logging.shutdown()
    os._exit(1)


if __name__ == "__main__":  # python -m tuili.distributed.worker OPTIONS_JSON RANK ADDR PORT
    options, rank, addr, port = sys.argv[1:]
    spawned_rank_main(EngineConfig(**json.loads(options)), int(rank), addr, int(port))
