"""ModelRunner: a scheduled Batch -> flat device tensors -> model -> logits of the rows that need them.
On the GPU, decode steps and steps with prefills that fit replay CUDA graphs (cuda_graphs.py).

It owns the device tensors: it allocates each layer's KV cache (bound to the model's Attention
modules, which read and write it) and the rotary tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuili.engine.request import Request
from tuili.engine.sampler import GraphSample
from tuili.engine.scheduler import Batch
from tuili.engine.state_cache import bind_states, restore_states
from tuili.engine.inputs import StepInputs, add_slots, pad_tables
from tuili.engine.transfer import copy_rows, to_device
from tuili.layers import kv_quant
from tuili.layers.attention import AttentionMetadata
from tuili.layers.encoder_attention import EncoderMetadata
from tuili.layers.rotary import RotaryEmbedding
from tuili.models.config import ModelConfig
from tuili.models.pooler import PooledRows


@dataclass
class PromptLogits:
    request: Request
    logits: torch.Tensor  # [m, vocab]: row j predicts prompt token first_target + j
    first_target: int


@dataclass
class StepOutput:
    sample_requests: list[Request] = field(default_factory=list)
    sample_logits: torch.Tensor | None = None  # [len(sample_requests), vocab], model dtype
    sample_argmax: torch.Tensor | None = None  # their argmax, when the decode graph computed it
    sample_graph: GraphSample | None = None  # samples them by a graph (DecodeGraphs.sampler_for)
    prompt_logits: list[PromptLogits] = field(default_factory=list)
    pooled_requests: list[Request] = field(default_factory=list)  # pooling requests, done
    pooled: torch.Tensor | None = None  # their embeddings [n, D] or scores [n] (Pooler)
    verify_requests: list[Request] = field(default_factory=list)  # decodes with drafts
    verify_logits: torch.Tensor | None = None  # their len(draft) + 1 rows each, in order
    tapped: torch.Tensor | None = None  # every row's hidden states the model's tap took

    def take_logits(self, logits: torch.Tensor) -> None:
        """Split the LM head's rows: sampled requests' first, then the verify rows."""
        n = len(self.sample_requests)
        self.sample_logits = logits[:n] if self.verify_requests else logits
        if self.verify_requests:
            self.verify_logits = logits[n:]


@dataclass
class ModelOutputs:
    """What `run` computed: the sampled rows' logits (and argmax, from a decode graph), every
    row's hidden states where pooling or prompt logprobs wanted them, the prompt rows' logits."""
    sample_logits: torch.Tensor | None = None
    sample_argmax: torch.Tensor | None = None
    decode_graph: bool = False
    hidden: torch.Tensor | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)


@dataclass
class DeviceTokens:
    """The last step's sampled tokens, still on the device, and each request's row in them."""
    tokens: torch.Tensor
    rows: dict[str, int]

    def feed(self, requests: list[Request]) -> tuple[list[int], list[int]]:
        """(batch rows, rows here) of the decodes whose input token is still pending."""
        pairs = [(i, self.rows[r.request_id]) for i, r in enumerate(requests) if r.num_pending]
        return [i for i, _ in pairs], [j for _, j in pairs]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int,
                 block_size: int, max_model_len: int, dtype: torch.dtype, device: torch.device,
                 cuda_graph_batch: int = 0, prefill_graph_tokens: int = 0, pooler=None,
                 channel=None, kv_dtype: torch.dtype | None = None,
                 kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 state_slots: int = 0, graph_sampling: bool = True, state_snapshots: int = 0):
        """state_slots, state_snapshots: a hybrid model's recurrent-state slots and prefix-cache
        snapshots (engine/state_cache.py); graph_sampling: decode graphs also sample (a draft's
        do not)."""
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.channel = channel  # distributed/channel.StepChannel on tensor-parallel rank 0
        self.pooler = pooler  # models/pooler.Pooler of a model serving embed or score
        self.encoder = getattr(model, "is_encoder", False)
        self.block_size = block_size
        self.kv_caches = []
        kv_dtype = kv_dtype or dtype  # FP8 (layers/kv_quant.py): with scales, bound before graphs
        for attn in model.attention_layers():  # this rank's KV heads (all, on one rank)
            shape = (num_blocks, block_size, attn.num_kv_heads, config.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
            self.kv_caches.append((attn.k_cache, attn.v_cache))
        if kv_scales is not None:
            kv_quant.bind(model.attention_layers(), kv_scales)
        if state_slots:
            bind_states(model, state_slots, dtype, device, state_snapshots)
        self.rope = RotaryEmbedding(config.head_dim, max_model_len, config.rope_theta,
                                    config.rope_scaling, dtype, device, config.rope_local_theta)
        self.graphs = self.prefill_graphs = None
        max_blocks = -(-max_model_len // block_size)
        # An encoder runs whole sequences eagerly (_execute_encoder): no graphs to capture.
        if device.type == "cuda" and not self.encoder and (cuda_graph_batch or prefill_graph_tokens):
            from tuili.engine.cuda_graphs import DecodeGraphs, PrefillGraphs

            pool = None  # one memory pool for all graphs: they never run at the same time
            if prefill_graph_tokens:
                self.prefill_graphs = PrefillGraphs(model, self.rope, prefill_graph_tokens,
                                                    max_blocks, device)
                pool = self.prefill_graphs.pool
            if cuda_graph_batch:
                self.graphs = DecodeGraphs(model, self.rope, cuda_graph_batch, max_blocks,
                                           block_size, device, pool, graph_sampling)

    @torch.inference_mode()
    def execute(self, batch: Batch, pending: DeviceTokens | None = None) -> StepOutput:
        """Queue the batch on the device; input tokens still pending are taken from `pending`."""
        if self.encoder:
            return self._execute_encoder(batch)
        inputs, out, prompt_reqs = self.prepare(batch, pending)
        tokens = pending.tokens if pending else None
        if self.channel is not None:  # tensor-parallel: the other ranks run the same inputs
            self.channel.send(inputs, tokens)
        ran = self.run(inputs, tokens)
        tap = getattr(self.model, "tap", None)
        if tap is not None:  # set by an EAGLE proposer; graph replays point it at their output
            out.tapped = tap.hidden[:len(inputs.ids)]
        if ran.sample_logits is not None:
            out.take_logits(ran.sample_logits)
        out.sample_argmax = ran.sample_argmax
        if ran.decode_graph:
            out.sample_graph = self.graphs.sampler_for(len(batch))
        if out.pooled_requests:
            rows = PooledRows.build(inputs.pool_seqs, len(inputs.ids), self.device)
            out.pooled = self.pooler(ran.hidden, rows)
        for (req, first), logits in zip(prompt_reqs, ran.prompt_logits):
            out.prompt_logits.append(PromptLogits(req, logits, first))
        return out

    def prepare(self, batch: Batch, pending: DeviceTokens | None = None
                ) -> tuple[StepInputs, StepOutput, list[tuple[Request, int]]]:
        """The batch's flat inputs, its output with the requests in place, and per prompt-logprob
        row group its request and first target token."""
        decodes = batch.requests[: batch.num_decodes]
        feed = pending.feed(decodes) if pending else ([], [])
        ids, positions, slots, tables, seq_lens, seqs = [], [], [], [], [], []
        out = StepOutput()
        sample_rows, prompt_rows, prompt_reqs, pool_seqs, verify_rows = [], [], [], [], []
        bs, row = self.block_size, 0
        for req, n, start, table in zip(batch.requests, batch.num_new, batch.starts,
                                        batch.block_tables):
            end = start + n
            ids.extend(req.token_ids[start:end])
            if req.draft:  # a verify step: the last real token, then the guesses
                ids.extend(req.draft.tokens)
            if req.num_pending and end > len(req.token_ids):  # fed from the device below
                ids.extend([0] * (end - max(start, len(req.token_ids))))
            positions.extend(range(start, end))
            add_slots(slots, table, start, end, bs)
            tables.append(table)
            seq_lens.append(end)
            seqs.append((row, n, start))
            if req.pooling is not None:  # scheduled whole (scheduler.py): pooled, not sampled
                pool_seqs.append((row, n))
                out.pooled_requests.append(req)
            elif req.draft:
                verify_rows.extend(range(row, row + n))
                out.verify_requests.append(req)
            elif end == req.num_tokens:
                sample_rows.append(row + n - 1)
                out.sample_requests.append(req)
            if req.wants_prompt_logprobs and start < req.num_prompt_tokens - 1:
                m = min(end, req.num_prompt_tokens - 1) - start
                prompt_rows.append((row, m))
                prompt_reqs.append((req, start + 1))
            row += n
        sample_rows += verify_rows  # a verify step's rows follow the sampled ones (take_logits)
        inputs = StepInputs(ids, positions, slots, tables, seq_lens, seqs, batch.num_decodes,
                            sample_rows, prompt_rows, pool_seqs, feed,
                            pending.tokens.shape[0] if pending else 0, batch.state_slots)
        ops = batch.state_ops
        if ops is not None and (ops.restores or ops.saves):
            index = {r.request_id: i for i, r in enumerate(batch.requests)}
            inputs.state_restores = ops.restores
            inputs.state_saves = [(index[rid], offset, snap) for rid, offset, snap in ops.saves]
        return inputs, out, prompt_reqs

    @torch.inference_mode()
    def run(self, inputs: StepInputs, tokens: torch.Tensor | None = None) -> ModelOutputs:
        """The model over a step's flat inputs (on every tensor-parallel rank alike: the same
        calls, so the same collectives); `tokens`: the last step's, for the rows of inputs.feed."""
        feed, seqs, sample_rows = inputs.feed, inputs.seqs, inputs.sample_rows
        num_tokens, ran = len(inputs.ids), ModelOutputs()
        if inputs.state_restores:  # prefix hits of a hybrid: their states before the step
            restore_states(self.model, inputs.state_restores, self.device)
        if self.graphs and inputs.num_decodes == len(seqs) <= self.graphs.max_batch:
            ran.sample_logits, ran.sample_argmax = self.graphs.run(
                inputs.ids, inputs.positions, inputs.slots, inputs.tables, feed, tokens,
                inputs.state_slots)
            ran.decode_graph = True
            return ran
        # A step with prefills replays a prefill graph when it fits, its decodes (if any) taken
        # as sequences of one new token.
        if (self.prefill_graphs and not inputs.prompt_rows and not inputs.pool_seqs
                and self.prefill_graphs.fits(num_tokens, len(seqs), len(sample_rows))):
            hidden = self.prefill_graphs.run(inputs.ids, inputs.positions, inputs.slots, seqs,
                                             inputs.tables, sample_rows, feed, tokens)
            if sample_rows:
                ran.sample_logits = self.model.logits(hidden)
            return ran
        nd = inputs.num_decodes
        dev, long = self.device, torch.long
        meta = self.model.backend.attention.metadata(
            slot_mapping=to_device(inputs.slots, long, dev),
            block_tables=to_device(pad_tables(inputs.tables), long, dev),
            seq_lens=to_device(inputs.seq_lens, long, dev),
            positions=to_device(inputs.positions, long, dev), rope=self.rope,
            num_decodes=nd, max_decode_len=max(inputs.seq_lens[:nd], default=0),
            prefills=seqs[nd:],
        )
        if inputs.state_slots:
            meta.state_slots = to_device(inputs.state_slots, long, dev)
            meta.state_slot_list = inputs.state_slots
            meta.state_saves = inputs.state_saves
        rows = to_device(sample_rows, long, dev) if sample_rows else None
        input_ids = to_device(inputs.ids, long, dev)
        if feed[0]:
            copy_rows(input_ids, feed[0], tokens, feed[1])
        if inputs.prompt_rows or inputs.pool_seqs:  # prompt logprobs and pooling want every row
            hidden = ran.hidden = self.model(input_ids, meta)
            if rows is not None:
                ran.sample_logits = self.model.logits(hidden.index_select(0, rows))
        else:  # only the sampled rows: the last layer skips the rest
            hidden = self.model(input_ids, meta, rows)
            if rows is not None:
                ran.sample_logits = self.model.logits(hidden)
        for start, m in inputs.prompt_rows:
            ran.prompt_logits.append(self.model.logits(hidden[start:start + m]).float())
        return ran

    def _execute_encoder(self, batch: Batch) -> StepOutput:
        """An encoder's step: whole sequences, no KV cache, every request pooled; its inputs and
        layout go to the device in one copy (EncoderMetadata.build)."""
        reqs = batch.requests
        types = [r.pooling.token_type_ids for r in reqs]
        if all(t is None for t in types):
            types = None
        else:
            types = [t if t is not None else [0] * len(r.token_ids) for r, t in zip(reqs, types)]
        ids, meta = EncoderMetadata.build([r.token_ids for r in reqs], self.device,
                                          self.dtype, types)
        hidden = self.model(ids, meta)
        rows = PooledRows(meta.first_rows, meta.lens, meta.seq_index)
        return StepOutput(pooled_requests=list(reqs), pooled=self.pooler(hidden, rows))


@torch.inference_mode()
def profile_activation_bytes(model: torch.nn.Module, config: ModelConfig, num_tokens: int,
                             dtype: torch.dtype, device: torch.device) -> int:
    """Peak GPU memory of one prefill step of `num_tokens` tokens, beyond what is allocated now.
    Runs over a stand-in cache of one-token blocks shared by every layer."""
    layers = model.attention_layers()
    stand_in = torch.zeros(num_tokens, 1, layers[0].num_kv_heads, config.head_dim, dtype=dtype,
                           device=device)
    for attn in layers:
        attn.k_cache = attn.v_cache = stand_in
    rope = RotaryEmbedding(config.head_dim, num_tokens, config.rope_theta, config.rope_scaling,
                           dtype, device, config.rope_local_theta)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    meta = AttentionMetadata.one_prefill(num_tokens, rope, device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), meta)
    model.logits(hidden[-1:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for attn in layers:
        attn.k_cache = attn.v_cache = None
    del hidden, meta, rope, stand_in
    torch.cuda.empty_cache()
    return peak
