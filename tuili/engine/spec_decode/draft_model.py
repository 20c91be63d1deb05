"""A smaller model of the same vocabulary guesses: it runs the request's new tokens (a prefill
when it first sees the request, then what the target kept) and k - 1 decodes, each draft drawn
from its own distribution with the request's sampling parameters. Its paged KV cache is its own
(own block pool, own runner); after a verify step it keeps the K/V of the tokens the target
kept and recomputes from there."""

from __future__ import annotations

import torch

from tuili.engine.kv_cache import BlockPool, KVCacheManager
from tuili.engine.request import Request
from tuili.engine.runner import ModelRunner
from tuili.engine.sampler import draw_seed
from tuili.engine.scheduler import Batch
from tuili.speculative_config import SpeculativeConfig
from tuili.engine.spec_decode.draft import Draft
from tuili.engine.spec_decode.verify import RowView, target_probs
from tuili.errors import InvalidParameter
from tuili.models import loader

_SALT = 0x27D4EB2F  # seeded requests' draft draws: a stream apart from the target's


class DraftSeq:
    """A request as the draft model's runner and KV manager see it: the tokens in (or going to)
    its cache, and how many of them are real (the target's) rather than guesses."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_real = 0
        self.num_pending = 0
        self.draft = self.pooling = None
        self.wants_prompt_logprobs = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def follow(self, req: Request) -> None:
        """Take the target's tokens; keep the computed ones that are still right."""
        real, tokens = self.num_real, req.token_ids
        keep = real
        for mine, theirs in zip(self.token_ids[real:self.num_computed_tokens], tokens[real:]):
            if mine != theirs:
                break
            keep += 1
        # the last token is always run again: its logits give the first draft
        self.num_computed_tokens = min(self.num_computed_tokens, keep, len(tokens) - 1)
        self.token_ids = list(tokens)
        self.num_real = len(tokens)


def draft_graph_sizes(spec: SpeculativeConfig, config) -> tuple[int, int]:
    """The draft's CUDA graphs: decode batches up to the largest batch that speculates, and
    prefill-like steps (a catch-up after a verify: up to k + 1 new tokens a sequence) up to the
    tokens of as many sequences as a prefill graph holds. Longer steps (a prompt's first
    catch-up) run eagerly."""
    from tuili.engine.cuda_graphs import PREFILL_SEQS

    batch = min(spec.disable_by_batch_size, config.max_num_seqs)
    tokens = min(config.max_prefill_graph_tokens, config.max_num_batched_tokens,
                 min(batch, PREFILL_SEQS) * (spec.num_speculative_tokens + 2))
    return batch, tokens


class DraftModelProposer:
    def __init__(self, spec: SpeculativeConfig, config, target_config, tokenizer,
                 max_model_len: int, num_blocks: int, dtype: torch.dtype, device: torch.device,
                 eager: bool = True):
        loaded = loader.load(spec.model, dtype, device)
        if loaded.config.vocab_size != target_config.vocab_size:
            raise InvalidParameter("speculative_config.model",
                                   f"{spec.model} has a vocabulary of {loaded.config.vocab_size} "
                                   f"tokens, the target {target_config.vocab_size}; a draft must "
                                   "share the target's tokenizer")
        self._start(loaded.model, loaded.config, spec, config, max_model_len, num_blocks, dtype,
                    device, eager)

    def _start(self, model, model_config, spec: SpeculativeConfig, config, max_model_len: int,
               num_blocks: int, dtype: torch.dtype, device: torch.device, eager: bool) -> None:
        """The draft's own KV cache, runner (with CUDA graphs unless `eager`) and random stream."""
        self.k = spec.num_speculative_tokens
        self.device = device
        self.kv = KVCacheManager(BlockPool(num_blocks, config.block_size, enable_caching=False))
        batch, tokens = (0, 0) if eager else draft_graph_sizes(spec, config)
        if hasattr(model, "reserve"):  # an EAGLE head stages its input states where graphs read
            model.reserve(max(batch, tokens))
        self.runner = ModelRunner(model, model_config, num_blocks, config.block_size,
                                  max_model_len, dtype, device, batch, tokens,
                                  graph_sampling=False)
        self.seqs: dict[str, DraftSeq] = {}
        self.generator = torch.Generator(device=device).manual_seed(config.seed + 1)

    def _seq(self, req: Request) -> DraftSeq:
        """The request's sequence here, made on first sight."""
        seq = self.seqs.get(req.request_id)
        if seq is None:
            seq = self.seqs[req.request_id] = DraftSeq(req.request_id)
        return seq

    def _execute(self, batch: Batch) -> torch.Tensor:
        """The draft model over one of its steps -> the logits of each sequence's last row."""
        return self.runner.execute(batch).sample_logits

    def propose(self, reqs: list[Request], caps: list[int]) -> list[Draft | None]:
        seqs = []
        for r in reqs:
            seq = self._seq(r)
            seq.follow(r)
            self.kv.trim(seq)
            seqs.append(seq)
        drafts: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        for step in range(max(caps)):
            live = [i for i in live if caps[i] > step]
            live = self._run(live, reqs, seqs, drafts, probs)
            if not live:
                break
        return [Draft(d, torch.cat(p)) if d else None for d, p in zip(drafts, probs)]

    def _run(self, live: list[int], reqs: list[Request], seqs: list[DraftSeq],
             drafts: list[list[int]], probs: list[list[torch.Tensor]]) -> list[int]:
        """One draft step over the live requests (decodes first, then catch-ups); each gains a
        draft. -> the requests that ran (a full pool leaves some out)."""
        live = sorted(live, key=lambda i: seqs[i].num_tokens - seqs[i].num_computed_tokens > 1)
        batch, ran = Batch(), []
        for i in live:
            seq = seqs[i]
            n = seq.num_tokens - seq.num_computed_tokens
            if not self.kv.allocate(seq, n):
                continue
            batch.add(seq, n, self.kv.block_ids(seq))
            if n == 1:
                batch.num_decodes += 1
            ran.append(i)
        if not ran:
            return []
        for seq, n in zip(batch.requests, batch.num_new):
            seq.num_computed_tokens += n
        logits = self._execute(batch)
        views = [RowView(reqs[i], drafts[i]) for i in ran]
        q, _ = target_probs(logits, views)
        noise = torch.empty_like(q).exponential_(generator=self.generator)
        for row, i in enumerate(ran):
            if reqs[i].seed is not None:
                own = torch.Generator(device=q.device).manual_seed(
                    draw_seed(reqs[i].seed ^ _SALT, views[row].num_output_tokens))
                noise[row].exponential_(generator=own)
        tokens = (q / noise).argmax(-1).tolist()  # exponential race: a draw from q
        for row, i in enumerate(ran):
            drafts[i].append(tokens[row])
            probs[i].append(q[row:row + 1])
            seqs[i].token_ids.append(tokens[row])
        return ran

    def release(self, req: Request) -> None:
        seq = self.seqs.pop(req.request_id, None)
        if seq is not None:
            self.kv.remove(seq)
