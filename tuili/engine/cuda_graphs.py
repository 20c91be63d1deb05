"""CUDA graphs: one per batch size for decode, one per token count for steps with prefills (their
decodes, if any, as one-token sequences); a step replays the graph of the next size up, padded.

Captured once at start-up over static input buffers; a replay launches the whole model (all
layers, and for decode the LM head) with one CPU call. At batch 1 the GPU then never waits on
Python between kernels, and a short prompt's prefill, which eager launches would leave
host-bound (launching an 8B-shaped model's layers takes longer than a short prefill's GPU work;
BENCHMARKS.md, "Measurements behind the code"), runs at the GPU's pace. Padding rows have slot -1 (no KV write) and, for decode,
length 0 (attention writes zeros); padding prefill sequences have no new tokens.

Each decode graph's greedy argmax also writes its own input-id row: when the next step replays
the same graph for the same requests in the same rows, fed with those greedy tokens, their ids
are in place already and only positions, slots and lengths are uploaded (no device copy between
graphs).

Decode batches of up to SAMPLE_BATCH rows also sample in a graph (one per batch size and candidate
width, over the decode graph's logits): temperature, top-k, top-p and min-p cost one parameter
upload and one replay instead of a dozen launches, so at batch 1 a sampled stream keeps the GPU as
busy as a greedy one. The sampled tokens go to the input-id row as the argmax does. Each also has
a masked twin for structured output: it copies the logits to a float32 buffer, applies the
step's grammar bitmask there (uploaded to a static buffer before the replay, from the mask the
host filled while the step ran), takes the masked argmax and samples, so a constrained stream
keeps the graphs (the raw logits stay unmasked for logprobs).
"""

from __future__ import annotations

import logging
import time
from array import array

import torch
from tqdm import tqdm

from tuili.engine.inputs import pad_tables
from tuili.engine.sampler import CANDIDATES, GraphSample, row_argmax, sample_on_gpu
from tuili.engine.state_cache import scratch_slot
from tuili.engine.transfer import copy_rows, readbacks_done, to_device, upload
from tuili.kernels import triton_module
from tuili.layers.attention import AttentionMetadata
from tuili.layers.rotary import RotaryEmbedding

log = logging.getLogger("tuili")

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
PREFILL_SIZES = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PREFILL_SEQS = 8  # sequences one prefill step may hold to replay a graph
SAMPLE_BATCH = 32  # decode batches up to this size sample in a graph too


def capture(sizes: list[int], forward, desc: str, pool=None, reset=None):
    """One CUDA graph of forward(size) per size, largest first, all in one memory pool (`pool`, or
    a new one); each size runs once before its capture to compile kernels and settle
    allocations, after reset(size) (when given) readies its inputs.
    -> ({size: graph}, {size: forward's outputs}, the pool)."""
    graphs, outputs = {}, {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for size in tqdm(sorted(sizes, reverse=True), desc=desc, leave=False):
            if reset is not None:
                reset(size)
            forward(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                outputs[size] = forward(size)
            pool = graph.pool()
            graphs[size] = graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs, outputs, pool


def tapped(model: torch.nn.Module) -> torch.Tensor | None:
    """The hidden states the model's tap took in the forward just run (None: no tap)."""
    tap = getattr(model, "tap", None)
    return tap.hidden if tap is not None else None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, rope: RotaryEmbedding, max_batch: int,
                 max_blocks: int, block_size: int, device: torch.device, pool=None,
                 sampling: bool = True):
        self.model, self.rope, self.block_size = model, rope, block_size
        self.sizes = [s for s in SIZES if s < max_batch] + [max_batch]
        long = dict(dtype=torch.long, device=device)
        # A hybrid's rows also name their recurrent-state slots; padding rows (and the capture)
        # update a scratch slot no sequence holds.
        self.scratch = scratch_slot(model)
        # Per batch size, one flat buffer of ids, positions, slots and lengths (and state
        # slots): one copy a step.
        rows = 4 if self.scratch is None else 5
        self.inputs = {size: torch.zeros(rows, size, **long) for size in self.sizes}
        for inputs in self.inputs.values():
            inputs[2].fill_(-1)  # no KV writes while capturing
            if self.scratch is not None:
                inputs[4].fill_(self.scratch)
        self.tables = torch.zeros(max_batch, max_blocks, **long)
        self._tables_held: list[list[int]] = []  # what the first rows of self.tables hold now
        start = time.perf_counter()
        with torch.inference_mode():
            self.graphs, outputs, self.pool = capture(self.sizes, self._forward,
                                                      "capturing decode CUDA graphs", pool)
        # Each size's logits and its rows' greedy tokens, computed in the graph.
        self.logits = {size: out[0] for size, out in outputs.items()}
        self.argmax = {size: out[1] for size, out in outputs.items()}
        self.tapped = {size: out[2] for size, out in outputs.items()}  # the model's tap, if set
        # Sampling graphs: per size, the rows' parameters (floats: 1 / temperature, top_p, min_p;
        # ints: top_k, seed), and a graph per candidate width (Sampler.row_params picks one);
        # none without `sampling` (a draft samples its own way: spec_decode/draft_model.py).
        vocab = self.logits[self.sizes[0]].shape[1]
        self.widths = sorted({1, min(vocab, CANDIDATES), vocab})
        self.sample_params = {
            size: (torch.zeros(3, size, dtype=torch.float32, device=device),
                   torch.zeros(2, size, **long))
            for size in self.sizes if sampling and size <= SAMPLE_BATCH}
        # The masked twins' inputs, shared by every size (one replay at a time): the grammar
        # bitmask (all ones: every token allowed) and the masked float32 logits.
        rows = max(self.sample_params, default=0)
        self.bitmask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32,
                                  device=device)
        self.masked = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        keys = [(size, width, masked) for size in self.sample_params for width in self.widths
                for masked in (False, True)]
        with torch.inference_mode():
            self.sample_graphs, self.sampled, self.pool = capture(
                keys, self._sample, "capturing sampling CUDA graphs", self.pool)
        # The outputs that also wrote a size's input ids (see run).
        self._fills = {t.data_ptr(): size for size, t in self.argmax.items()}
        self._fills.update({t.data_ptr(): key[0] for key, t in self.sampled.items()})
        log.info("captured %d decode CUDA graphs (batch 1..%d) and %d sampling graphs in %.1fs",
                 len(self.sizes), self.max_batch, len(keys), time.perf_counter() - start)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions, slots, seq_lens = self.inputs[size][:4]
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=self.tables[:size], seq_lens=seq_lens,
            positions=positions, rope=self.rope, num_decodes=size, max_decode_len=0, prefills=[])
        if self.scratch is not None:
            meta.state_slots = self.inputs[size][4]
        logits = self.model.logits(self.model(ids, meta))
        return logits, row_argmax(logits, also=ids), tapped(self.model)

    def _sample(self, key: tuple[int, int, bool]) -> torch.Tensor:
        size, width, masked = key
        logits, greedy = self.logits[size], self.argmax[size]
        if masked:
            logits = self.masked[:size]
            logits.copy_(self.logits[size])
            triton_module("triton_bitmask").apply_bitmask(logits, self.bitmask[:size])
            greedy = row_argmax(logits)
        tokens = sample_on_gpu(logits, greedy, *self.sample_params[size], width)
        self.inputs[size][0].copy_(tokens)
        return tokens

    def sampler_for(self, n: int) -> GraphSample | None:
        """For the batch of n rows that `run` just replayed, a function that samples its logits
        by a graph (given Sampler.row_params), or None where the batch is too big for one."""
        size = next(s for s in self.sizes if s >= n)
        if size not in self.sample_params:
            return None

        def sample(floats: list[list[float]], ints: list[list[int]], width: int,
                   bitmask: torch.Tensor | None = None) -> torch.Tensor:
            params_f, params_i = self.sample_params[size]
            pad = size - n
            upload(params_f, [row + [0.0] * pad for row in floats])  # padding rows: greedy
            upload(params_i, [row + [1] * pad for row in ints])
            masked = bitmask is not None
            if masked:  # device to device; padding rows keep every token
                self.bitmask[:n].copy_(bitmask)
                self.bitmask[n:size].fill_(-1)
            readbacks_done(params_f.device)
            self.sample_graphs[size, width, masked].replay()
            return self.sampled[size, width, masked][:n]

        return sample

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], feed: tuple[list[int], list[int]] = ([], []),
            tokens: torch.Tensor | None = None, state_slots: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [n, vocab] and their argmax [n] for a step of n decodes (one new token each:
        its id, position, cache slot and block table, and a hybrid's state slot). The input
        tokens of rows feed[0] are still on the device (0 stands in for them in ids): rows
        feed[1] of `tokens`."""
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        tables = pad_tables(tables)
        pad = [0] * (size - n)
        inputs = self.inputs[size]
        rest = [positions + pad, slots + [-1] * len(pad), [p + 1 for p in positions] + pad]
        if self.scratch is not None:
            rest.append(state_slots + [self.scratch] * len(pad))
        if (tokens is not None and self._fills.get(tokens.data_ptr()) == size
                and feed[0] == feed[1] == list(range(n))):
            upload(inputs[1:], rest)  # every id is this size's last token, already in place
        else:
            upload(inputs, [ids + pad] + rest)
            if feed[0]:
                copy_rows(inputs[0], feed[0], tokens, feed[1])
        if tables != self._tables_held:  # a batch keeps its tables for block_size steps
            self.tables[:n, :len(tables[0])].copy_(to_device(tables, torch.long, inputs.device))
            self._tables_held = tables
        readbacks_done(inputs.device)  # the replay rewrites the outputs the last step reads back
        self.graphs[size].replay()
        if self.tapped[size] is not None:
            self.model.tap.hidden = self.tapped[size]
        return self.logits[size][:n], self.argmax[size][:n]


class PrefillGraphs:
    """Graphs of the model's forward over steps with prefills of up to PREFILL_SEQS sequences
    and max_tokens tokens, decodes among them taken as sequences of one new token (so a request
    arriving while others decode does not drop the step to eager launches); the step's tokens
    are padded to the next captured count. A graph puts out the hidden states of the rows the
    step samples (the last layer runs its o_proj and MLP on those alone, as eagerly); the LM
    head runs after it, on as many rows as are sampled, or not at all for a chunk that samples
    none."""

    def __init__(self, model: torch.nn.Module, rope: RotaryEmbedding, max_tokens: int,
                 max_blocks: int, device: torch.device):
        self.model, self.rope = model, rope
        self.sizes = [s for s in PREFILL_SIZES if s < max_tokens] + [max_tokens]
        long = dict(dtype=torch.long, device=device)
        # ids, positions and slots of a step of t tokens, back to back in the first 3t entries
        # (one copy a step), then the sampled rows; each graph reads its own views.
        self.tokens = torch.zeros(3 * self.max_tokens + PREFILL_SEQS, **long)
        self.seqs = torch.zeros(3, PREFILL_SEQS, dtype=torch.int32, device=device)
        self.tables = torch.zeros(PREFILL_SEQS, max_blocks, **long)
        self.seq_lens = torch.zeros(PREFILL_SEQS, **long)  # decode's input: unused here
        start = time.perf_counter()
        with torch.inference_mode():
            self.graphs, outputs, self.pool = capture(
                self.sizes, self._forward, "capturing prefill CUDA graphs", reset=self._reset)
        self.hidden = {size: out[0] for size, out in outputs.items()}
        self.tapped = {size: out[1] for size, out in outputs.items()}  # the model's tap, if set
        log.info("captured %d prefill CUDA graphs (up to %d tokens, %d sequences) in %.1fs",
                 len(self.sizes), self.max_tokens, PREFILL_SEQS, time.perf_counter() - start)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def fits(self, num_tokens: int, num_seqs: int, num_rows: int = 0) -> bool:
        """Whether a step of these tokens, sequences and sampled rows (a verify step samples
        several per sequence) fits the graphs."""
        return num_tokens <= self.max_tokens and max(num_seqs, num_rows) <= PREFILL_SEQS

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, positions, slots = self.tokens[:3 * size].view(3, size)
        return ids, positions, slots, self.tokens[3 * size:3 * size + PREFILL_SEQS]

    def _reset(self, size: int) -> None:
        self.tokens.zero_()
        self._views(size)[2].fill_(-1)  # no KV writes while capturing

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, positions, slots, rows = self._views(size)
        # prefills stands in for the sequences (their real sizes are in seqs, on the device):
        # the attention kernel's launch covers any sequence of up to `size` new tokens.
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=self.tables, seq_lens=self.seq_lens,
            positions=positions, rope=self.rope, num_decodes=0, max_decode_len=0,
            prefills=[(0, size, 0)], prefill_seqs=self.seqs)
        return self.model(ids, meta, rows), tapped(self.model)

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            seqs: list[tuple[int, int, int]], tables: list[list[int]],
            sample_rows: list[int], feed: tuple[list[int], list[int]] = ([], []),
            tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states [len(sample_rows), hidden] of a step (`fits`): the flat tokens' ids,
        positions and cache slots, each sequence's (first row, new tokens, cached tokens) and
        block table, and the rows to sample. The ids of rows feed[0] are still on the device:
        rows feed[1] of `tokens`."""
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        pad, seq_pad = size - n, PREFILL_SEQS - len(seqs)
        flat = array("q", ids)
        flat.extend([0] * pad)
        flat.extend(positions)
        flat.extend([0] * pad)
        flat.extend(slots)
        flat.extend([-1] * pad)
        flat.extend(sample_rows)
        flat.extend([0] * (PREFILL_SEQS - len(sample_rows)))
        upload(self.tokens[:len(flat)], flat)
        if feed[0]:
            copy_rows(self.tokens[:size], feed[0], tokens, feed[1])
        upload(self.seqs, [list(col) + [0] * seq_pad for col in zip(*seqs)])
        tables = pad_tables(tables)
        self.tables[:len(tables), :len(tables[0])].copy_(
            to_device(tables, torch.long, self.tokens.device))
        readbacks_done(self.tokens.device)  # the replay may reuse memory other graphs' outputs hold
        self.graphs[size].replay()
        if self.tapped[size] is not None:
            self.model.tap.hidden = self.tapped[size]
        return self.hidden[size][:len(sample_rows)]
