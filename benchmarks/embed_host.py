"""Where an LLM.embed call's time goes outside the model's forward: its host work (tokenizing,
requests, scheduling, metadata, pooling, normalizing, outputs) and the torch ops it issues beside
the forward's (each a kernel launch on the GPU). Used by cpu_embed.py --host and gpu_embed.py
--profile.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while `counting`, views apart (no kernel on the GPU)."""

    def __init__(self):
        super().__init__()
        self.counting, self.ops, self.views = True, Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.ops[func.overloadpacket.__name__] += 1
            self.views += getattr(func, "is_view", False)
        return func(*args, **(kwargs or {}))


@contextmanager
def _forward_replaced(model, forward):
    original = model.forward
    model.forward = forward
    try:
        yield
    finally:
        model.forward = original


def ops_outside_forward(llm, batch: list[str] | str) -> tuple[int, int, Counter]:
    """(ops, of them views, ops by name) that one embed call issues outside the forward."""
    model = llm.engine.runner.model
    counter, forward = _OpCounter(), model.forward

    def quiet(*args, **kwargs):
        counter.counting = False
        try:
            return forward(*args, **kwargs)
        finally:
            counter.counting = True

    with _forward_replaced(model, quiet), counter:
        llm.embed(batch)
    return sum(counter.ops.values()), counter.views, counter.ops


def host_ms_per_call(llm, calls: list, repeats: int = 5) -> float:
    """Best ms per embed call with the forward replaced by a stand-in that returns ready token
    states: what is left is the call's host work (steadier than a loaded machine's forward)."""
    model = llm.engine.runner.model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    states = torch.randn(llm.engine.config.max_num_batched_tokens, model.config.hidden_size,
                         dtype=dtype, device=device)

    def stand_in(input_ids, meta):
        return states[:input_ids.shape[0]]

    best = float("inf")
    with _forward_replaced(model, stand_in):
        llm.embed(calls[0])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in calls:
                llm.embed(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / len(calls))
    return best * 1e3


def report(llm, items: list[str], repeats: int = 5) -> None:
    """Print, at batch 1 and 64, host ms per call (forward stood in for) of texts and of the same
    texts' token ids (the tokenizer's share left out), and the ops issued outside the forward."""
    ids = llm.tokenizer.encode_many(items)
    for batch in (1, 64):
        if batch == 1:
            calls, id_calls = items[:64], [[i] for i in ids[:64]]
        else:
            calls = [items[i:i + 64] for i in range(0, len(items), 64)]
            id_calls = [ids[i:i + 64] for i in range(0, len(items), 64)]
        ms, id_ms = host_ms_per_call(llm, calls, repeats), host_ms_per_call(llm, id_calls, repeats)
        ops, views, names = ops_outside_forward(llm, calls[0])
        top = ", ".join(f"{name} {n}" for name, n in names.most_common(6))
        print(f"batch {batch:2d}: host {ms:.3f} ms a call outside the forward ({id_ms:.3f} from "
              f"token ids); {ops} ops outside it ({views} views): {top}", flush=True)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.tokenizer.encode_many(items[:64])
        best = min(best, time.perf_counter() - start)
    print(f"tokenizing 64 texts alone: {best * 1e3:.3f} ms", flush=True)
