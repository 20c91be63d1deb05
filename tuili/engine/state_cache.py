"""A hybrid model's recurrent states: a fixed pool of slots, one per running sequence, each
holding every mixer layer's conv and SSM state (layers/mamba2.py). The KV-cache manager hands a
request its slot with its first blocks and takes it back with them (finished, aborted or
preempted: a preempted request is recomputed from its prompt, its state from zero); the runner
allocates the pools. With prefix caching, snapshots of the states at prompts' last block
boundaries let a prefix hit start from them. A model without mixer layers has none of this."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from tuili.config import EngineConfig
from tuili.errors import InvalidParameter

log = logging.getLogger("tuili")


def state_layers(model: torch.nn.Module) -> list:
    """The model's layers that keep a recurrent state per sequence (none for most models)."""
    layers = getattr(model, "state_layers", None)
    return layers() if layers is not None else []


def state_bytes_per_seq(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of one slot: every mixer layer's conv and SSM state."""
    element = torch.finfo(dtype).bits // 8
    return sum(math.prod(shape) * element for layer in state_layers(model)
               for shape in layer.state_shapes())


def bind_states(model: torch.nn.Module, slots: int, dtype: torch.dtype, device: torch.device,
                snapshots: int = 0) -> None:
    """Allocate each mixer layer's pools of `slots` slots, plus a scratch one (scratch_slot),
    and of `snapshots` prefix-cache snapshots, and bind them to it."""
    for layer in state_layers(model):
        conv, ssm = layer.state_shapes()
        layer.conv_state = torch.zeros(slots + 1, *conv, dtype=dtype, device=device)
        layer.ssm_state = torch.zeros(slots + 1, *ssm, dtype=dtype, device=device)
        if snapshots:
            layer.conv_snapshots = torch.zeros(snapshots, *conv, dtype=dtype, device=device)
            layer.ssm_snapshots = torch.zeros(snapshots, *ssm, dtype=dtype, device=device)


def scratch_slot(model: torch.nn.Module) -> int | None:
    """The slot past the scheduler's: the decode graphs' padding rows update it (None: the model
    keeps no states, or they are not bound)."""
    layers = state_layers(model)
    if not layers or layers[0].conv_state is None:
        return None
    return layers[0].conv_state.shape[0] - 1


def restore_states(model: torch.nn.Module, restores: list[tuple[int, int]],
                   device: torch.device) -> None:
    """Copy each (snapshot, slot) pair's snapshot into the slot, in every mixer layer: a prefix
    hit's states, before the step that goes on from them."""
    snaps = torch.tensor([s for s, _ in restores], device=device)
    slots = torch.tensor([t for _, t in restores], device=device)
    for layer in state_layers(model):
        layer.conv_state.index_copy_(0, slots, layer.conv_snapshots.index_select(0, snaps))
        layer.ssm_state.index_copy_(0, slots, layer.ssm_snapshots.index_select(0, snaps))


@dataclass
class StateOps:
    """A step's copies between slots and snapshots, queued by the KV-cache manager as it
    schedules: restores (snapshot, slot) run before the step; saves (request id, tokens into its
    chunk, snapshot) take its state part-way through its prefill chunk."""
    restores: list[tuple[int, int]] = field(default_factory=list)
    saves: list[tuple[str, int, int]] = field(default_factory=list)


class StateSlots:
    """Free slot ids (a request holds at most one), and the prefix cache's snapshots: a slot's
    states copied at a prompt's last block boundary, found by the chained hash of the block that
    ends there (least recently used evicted first). A prefix hit counts only up to a block with a
    snapshot; its snapshot is copied into the request's slot when the request gets one."""

    def __init__(self, num_slots: int, num_snapshots: int = 0):
        self.num_slots, self.num_snapshots = num_slots, num_snapshots
        self.free = list(range(num_slots - 1, -1, -1))  # pop() takes the lowest first
        self.owner: dict[str, int] = {}  # request id -> slot
        self.snapshots: OrderedDict[int, int] = OrderedDict()  # block hash -> snapshot id
        self.free_snapshots = list(range(num_snapshots - 1, -1, -1))
        self.restore: dict[str, int] = {}  # request id -> the snapshot its slot starts from
        self.ops = StateOps()

    def slot(self, request_id: str) -> int | None:
        return self.owner.get(request_id)

    def take(self, request_id: str) -> bool:
        """Give the request a slot if it has none (queueing its prefix hit's restore); False when
        none is free."""
        if request_id in self.owner:
            return True
        if not self.free:
            return False
        slot = self.owner[request_id] = self.free.pop()
        if request_id in self.restore:
            self.ops.restores.append((self.restore.pop(request_id), slot))
        return True

    def release(self, request_id: str) -> None:
        self.restore.pop(request_id, None)
        slot = self.owner.pop(request_id, None)
        if slot is not None:
            self.free.append(slot)

    def find(self, block_hash: int) -> int | None:
        """The snapshot taken where the block of this hash ends (None: none kept)."""
        snap = self.snapshots.get(block_hash)
        if snap is not None:
            self.snapshots.move_to_end(block_hash)
        return snap

    def save(self, request_id: str, offset: int, block_hash: int) -> None:
        """Queue a snapshot of the request's state `offset` tokens into this step's chunk, kept
        under block_hash (unless one is kept already). Device copies run in step order, so a
        snapshot evicted here is still read by restores queued before this step's compute."""
        if not self.num_snapshots or block_hash in self.snapshots:
            return
        if self.free_snapshots:
            snap = self.free_snapshots.pop()
        else:
            _, snap = self.snapshots.popitem(last=False)
        self.snapshots[block_hash] = snap
        self.ops.saves.append((request_id, offset, snap))

    def take_ops(self) -> StateOps:
        ops, self.ops = self.ops, StateOps()
        return ops


def hybrid_config(config: EngineConfig, device: torch.device) -> EngineConfig:
    """The engine options a hybrid model runs under: no speculative decoding (a rejected draft's
    K/V rolls back, a recurrent state cannot), no prefill CUDA graphs (the mixers' prefill walks
    its sequences on the host; decode graphs carry the state slots)."""
    if config.speculative_config:
        raise InvalidParameter("speculative_config", "a hybrid model's recurrent state cannot roll "
                               "back rejected drafts; unset speculative_config")
    if device.type == "cuda" and not config.enforce_eager and config.max_prefill_graph_tokens:
        log.info("prefill CUDA graphs are off for a hybrid model (decode graphs stay on)")
        return replace(config, max_prefill_graph_tokens=0)
    return config
