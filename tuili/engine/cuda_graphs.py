"""CUDA graphs for decode: one graph per batch size, replayed with the batch padded to the next size.

Captured once at start-up over static input buffers; a replay launches the whole model (all
layers, the LM head) with one CPU call, so at batch 1 the GPU never waits on Python between
kernels. Padding rows have slot -1 (no KV write) and length 0 (attention writes zeros).

Each graph's greedy argmax also writes its own input-id row: when the next step replays the same
graph for the same requests in the same rows, fed with those greedy tokens, their ids are in
place already and only positions, slots and lengths are uploaded (no device copy between graphs).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from tuili.engine.request import Request
from tuili.engine.sampler import row_argmax
from tuili.engine.transfer import copy_rows, readbacks_done, to_device, upload
from tuili.layers.attention import AttentionMetadata
from tuili.layers.rotary import RotaryEmbedding

log = logging.getLogger("tuili")

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, rope: RotaryEmbedding, max_batch: int,
                 max_blocks: int, block_size: int, device: torch.device):
        self.model, self.rope, self.block_size = model, rope, block_size
        self.sizes = [s for s in SIZES if s < max_batch] + [max_batch]
        long = dict(dtype=torch.long, device=device)
        # Per batch size, one flat buffer of ids, positions, slots and lengths: one copy a step.
        self.inputs = {size: torch.zeros(4, size, **long) for size in self.sizes}
        for inputs in self.inputs.values():
            inputs[2].fill_(-1)  # no KV writes while capturing
        self.tables = torch.zeros(max_batch, max_blocks, **long)
        self._tables_held: list[list[int]] = []  # what the first rows of self.tables hold now
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.argmax: dict[int, torch.Tensor] = {}  # each row's greedy token, computed in the graph
        self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, seq_lens = self.inputs[size]
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=self.tables[:size], seq_lens=seq_lens,
            positions=positions, rope=self.rope, num_decodes=size, max_decode_len=0, prefills=[])
        return self.model.logits(self.model(ids, meta))

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in tqdm(sorted(self.sizes, reverse=True), desc="capturing decode CUDA graphs",
                             leave=False):
                row_argmax(self._forward(size))  # warm-up: compile kernels, settle allocations
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[size] = self._forward(size)
                    self.argmax[size] = row_argmax(self.logits[size], also=self.inputs[size][0])
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1fs", len(self.sizes),
                 self.max_batch, time.perf_counter() - start)

    def run(self, requests: list[Request], feed: tuple[list[int], list[int]] = ([], []),
            tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [len(requests), vocab] and their argmax [len(requests)] for a batch of decodes
        (one new token each). The input tokens of rows feed[0] are still on the device: rows
        feed[1] of `tokens`."""
        n, bs = len(requests), self.block_size
        size = next(s for s in self.sizes if s >= n)
        positions = [r.num_computed_tokens for r in requests]
        ids = [r.token_ids[p] for r, p in zip(requests, positions)]
        slots = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(requests, positions)]
        width = max(len(r.block_ids) for r in requests)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in requests]
        pad = [0] * (size - n)
        inputs = self.inputs[size]
        rest = [positions + pad, slots + [-1] * len(pad), [p + 1 for p in positions] + pad]
        if (tokens is not None and tokens.data_ptr() == self.argmax[size].data_ptr()
                and feed[0] == feed[1] == list(range(n))):
            upload(inputs[1:], rest)  # every id is this graph's last argmax, already in place
        else:
            upload(inputs, [ids + pad] + rest)
            if feed[0]:
                copy_rows(inputs[0], feed[0], tokens, feed[1])
        if tables != self._tables_held:  # a batch keeps its tables for block_size steps
            self.tables[:n, :width].copy_(to_device(tables, torch.long, inputs.device))
            self._tables_held = tables
        readbacks_done(inputs.device)  # the replay rewrites the outputs the last step reads back
        self.graphs[size].replay()
        return self.logits[size][:n], self.argmax[size][:n]
