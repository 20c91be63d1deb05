"""CUDA graphs for decode: one graph per batch size, replayed with the batch padded to the next size.

Captured once at start-up over static input buffers; a replay launches the whole model (all
layers, the LM head) with one CPU call, so at batch 1 the GPU never waits on Python between
kernels. Padding rows have slot -1 (no KV write) and length 0 (attention writes zeros).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from tuili.engine.request import Request
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
        self.ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slots = torch.full((max_batch,), -1, **long)
        self.seq_lens = torch.zeros(max_batch, **long)
        self.tables = torch.zeros(max_batch, max_blocks, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        cos, sin = self.rope.lookup(self.positions[:size])
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size], block_tables=self.tables[:size],
            seq_lens=self.seq_lens[:size], cos=cos, sin=sin, num_decodes=size,
            max_decode_len=0, prefills=[])
        return self.model.logits(self.model(self.ids[:size], meta)).float()

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in tqdm(sorted(self.sizes, reverse=True), desc="capturing decode CUDA graphs",
                             leave=False):
                self._forward(size)  # warm-up: compile kernels, settle allocations
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[size] = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1fs", len(self.sizes),
                 self.max_batch, time.perf_counter() - start)

    def run(self, requests: list[Request]) -> torch.Tensor:
        """Logits [len(requests), vocab] for a batch of decodes (one new token each)."""
        n, bs = len(requests), self.block_size
        size = next(s for s in self.sizes if s >= n)
        positions = [r.num_computed_tokens for r in requests]
        ids = [r.token_ids[p] for r, p in zip(requests, positions)]
        slots = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(requests, positions)]
        width = max(len(r.block_ids) for r in requests)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in requests]
        pad = size - n
        self.ids[:size].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.seq_lens[:size].copy_(torch.tensor([p + 1 for p in positions] + [0] * pad),
                                   non_blocking=True)
        self.tables[:n, :width].copy_(torch.tensor(tables), non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:n]
