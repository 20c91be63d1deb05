"""Each step's flat inputs, from rank 0 to the other ranks: the host lists over the gloo group
(one pickled record), the last step's tokens still on the device over the model's group (on the
GPU, NCCL copies them device to device without a host sync: async scheduling keeps working)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tuili.distributed.group import TensorParallel
from tuili.engine.inputs import StepInputs


class StepChannel:
    def __init__(self, tp: TensorParallel, device: torch.device):
        self.tp, self.device = tp, device

    def send(self, inputs: StepInputs, tokens: torch.Tensor | None) -> None:
        """Rank 0: the step the other ranks run next (and `tokens`, where rows feed from it)."""
        dist.broadcast_object_list([inputs], src=0, group=self.tp.cpu_group)
        if inputs.feed[0]:
            dist.broadcast(tokens.long().contiguous(), src=0, group=self.tp.group)

    def stop(self) -> None:
        """Rank 0: no more steps; the other ranks leave their loop."""
        dist.broadcast_object_list([None], src=0, group=self.tp.cpu_group)

    def receive(self) -> tuple[StepInputs, torch.Tensor | None] | None:
        """Ranks 1..N-1: the next step and its device tokens, or None once rank 0 stops."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.tp.cpu_group)
        inputs = box[0]
        if inputs is None:
            return None
        tokens = None
        if inputs.feed[0]:
            tokens = torch.empty(inputs.num_device_tokens, dtype=torch.long, device=self.device)
            dist.broadcast(tokens, src=0, group=self.tp.group)
        return inputs, tokens
