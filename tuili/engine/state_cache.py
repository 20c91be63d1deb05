"""A hybrid model's recurrent states: a fixed pool of slots, one per running sequence, each
holding every mixer layer's conv and SSM state (layers/mamba2.py). The KV-cache manager hands a
request its slot with its first blocks and takes it back with them (finished, aborted or
preempted: a preempted request is recomputed from its prompt, its state from zero); the runner
allocates the pools. A model without mixer layers has none of this."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

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


def bind_states(model: torch.nn.Module, slots: int, dtype: torch.dtype,
                device: torch.device) -> None:
    """Allocate each mixer layer's pools of `slots` slots and bind them to it."""
    for layer in state_layers(model):
        conv, ssm = layer.state_shapes()
        layer.conv_state = torch.zeros(slots, *conv, dtype=dtype, device=device)
        layer.ssm_state = torch.zeros(slots, *ssm, dtype=dtype, device=device)


class StateSlots:
    """Free slot ids; a request holds at most one."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free = list(range(num_slots - 1, -1, -1))  # pop() takes the lowest first
        self.owner: dict[str, int] = {}  # request id -> slot

    def slot(self, request_id: str) -> int | None:
        return self.owner.get(request_id)

    def take(self, request_id: str) -> bool:
        """Give the request a slot if it has none; False when none is free."""
        if request_id in self.owner:
            return True
        if not self.free:
            return False
        self.owner[request_id] = self.free.pop()
        return True

    def release(self, request_id: str) -> None:
        slot = self.owner.pop(request_id, None)
        if slot is not None:
            self.free.append(slot)


def hybrid_config(config: EngineConfig, device: torch.device) -> EngineConfig:
    """The engine options a hybrid model runs under: no speculative decoding (a rejected draft's
    K/V rolls back, a recurrent state cannot), no prefix caching (a cached block's K/V says
    nothing of the mixer states at its end; no states are snapshotted yet), eager steps (the
    CUDA graphs do not carry the state slots yet)."""
    if config.speculative_config:
        raise InvalidParameter("speculative_config", "a hybrid model's recurrent state cannot roll "
                               "back rejected drafts; unset speculative_config")
    changes = {}
    if config.enable_prefix_caching:
        log.info("prefix caching is off: a hybrid model's recurrent states are not snapshotted "
                 "at block boundaries, so a prefix hit could not restore them")
        changes["enable_prefix_caching"] = False
    if device.type == "cuda" and not config.enforce_eager:
        log.info("CUDA graphs are off for a hybrid model (its steps run eagerly)")
        changes["enforce_eager"] = True
    return replace(config, **changes) if changes else config
