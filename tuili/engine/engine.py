"""LLMEngine: step() = schedule -> run -> sample -> update. The only loop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from tuili.config import EngineConfig
from tuili.engine.detokenizer import Detokenizer
from tuili.engine.kv_cache import BlockPool, KVCacheManager
from tuili.engine.request import PENDING, Request, Status
from tuili.engine.runner import DeviceTokens, ModelRunner, StepOutput, profile_activation_bytes
from tuili.engine.sampler import SampledTokens, Sampler, token_logprobs
from tuili.engine.scheduler import Batch, Scheduler
from tuili.engine.transfer import to_device
from tuili.errors import InvalidParameter, PromptTooLong
from tuili.kernels import HAS_TRITON
from tuili.layers.linear import Int4CpuMethod
from tuili.models import loader
from tuili.outputs import CompletionOutput, RequestOutput
from tuili.sampling_params import SamplingParams

log = logging.getLogger("tuili")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    # On CPUs with bf16 units (AMX / AVX512-BF16) bf16 halves the weight bytes per token and
    # batches run about twice as fast; elsewhere bf16 is emulated and slower than float32.
    return torch.bfloat16 if _has_cpu_bf16() else torch.float32


def _has_cpu_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class _Sample:
    """One of a request's n samples: its sequence and the streaming state around it."""
    request: Request
    group_id: str
    index: int
    detok: Detokenizer
    sent_tokens: int = 0
    undecoded: list[int] = field(default_factory=list)  # tokens whose text is not built yet


@dataclass
class _InFlight:
    """A step whose sampled tokens are not read back yet."""
    requests: list[Request]  # the batch
    sampled_requests: list[Request]  # those that sampled a token (each has a PENDING one)
    sampled: SampledTokens | None
    groups: list[str]  # the groups it advanced, in batch order

    @property
    def device_tokens(self) -> DeviceTokens | None:
        if self.sampled is None:
            return None
        return DeviceTokens(self.sampled.tokens,
                            {r.request_id: i for i, r in enumerate(self.sampled_requests)})


class _Group:
    """The n samples of one user request."""

    def __init__(self, request_id: str, prompt: str | None, samples: list[_Sample], stream: bool):
        self.request_id, self.prompt, self.samples = request_id, prompt, samples
        self.stream = stream  # report every step's progress, not only the final output

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        if config.max_num_batched_tokens is None:
            # GPU steps are cheap per token up to several thousand; CPU steps are not.
            config = self.config = replace(
                config, max_num_batched_tokens=8192 if self.device.type == "cuda" else 1024)
        self.dtype = pick_dtype(config.dtype, self.device)
        start = time.perf_counter()
        loaded = loader.load(config.model, self.dtype, self.device, config.revision,
                             config.quantization)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.eos_token_ids = frozenset(loaded.config.eos_token_ids)
        # CUDA graphs: decode batches up to max_num_seqs, prefill steps up to this many tokens.
        eager = config.enforce_eager or not HAS_TRITON or self.device.type != "cuda"
        self.prefill_graph_tokens = 0 if eager else min(config.max_prefill_graph_tokens,
                                                        config.max_num_batched_tokens)
        num_blocks, self.max_model_len = self._plan_kv_cache(loaded.model)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.runner = ModelRunner(loaded.model, self.model_config, num_blocks, config.block_size,
                                  self.max_model_len, self.dtype, self.device,
                                  0 if eager else config.max_num_seqs, self.prefill_graph_tokens)
        self.sampler = Sampler(config.seed, self.device)
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self.groups: dict[str, _Group] = {}
        self.samples: dict[str, _Sample] = {}  # by the sequence's own request id
        self.inflight: _InFlight | None = None  # the last step, its tokens not read back yet
        self.profiler = None
        if config.profile:
            from tuili.analysis.profiler import PhaseProfiler

            int4_rows = Int4CpuMethod.MAX_ROWS if loaded.quantization == "int4" else 0
            self.profiler = PhaseProfiler.for_run(self.model_config, str(self.dtype), self.device,
                                                  int4_rows)
        weights = "int4 weights" if loaded.quantization == "int4" else "weights"
        log.info("loaded %s (%s, %s %s, %s) in %.1fs", loaded.source, self.model_config.architecture,
                 str(self.dtype).removeprefix("torch."), weights, self.device,
                 time.perf_counter() - start)

    def _plan_kv_cache(self, model: torch.nn.Module) -> tuple[int, int]:
        c, mc = self.config, self.model_config
        per_block = c.block_size * mc.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)
        num_blocks = c.num_kv_blocks or int(self._kv_budget_bytes(model) // per_block)
        capacity = num_blocks * c.block_size
        if num_blocks < 1:
            raise InvalidParameter("kv_cache_memory_gb", f"the KV-cache budget holds no block of "
                                   f"{per_block} bytes; raise kv_cache_memory_gb or "
                                   "gpu_memory_utilization")
        if c.max_model_len is not None and c.max_model_len > capacity:
            raise InvalidParameter("max_model_len", f"{c.max_model_len} is more than the KV cache's "
                                   f"{capacity} tokens; lower it or raise kv_cache_memory_gb")
        max_len = c.max_model_len or min(mc.max_position_embeddings, capacity)
        if not c.enable_chunked_prefill and c.max_num_batched_tokens < max_len:
            raise InvalidParameter("max_num_batched_tokens", f"{c.max_num_batched_tokens} < "
                                   f"max_model_len={max_len}: without chunked prefill a whole prompt "
                                   "must fit in one step")
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); max_model_len %d",
                 num_blocks, c.block_size, capacity, num_blocks * per_block / 2**30, max_len)
        return num_blocks, max_len

    def _kv_budget_bytes(self, model: torch.nn.Module) -> float:
        c = self.config
        if c.kv_cache_memory_gb is not None:
            return c.kv_cache_memory_gb * 2**30
        if self.device.type != "cuda" or not HAS_TRITON:
            return 2**30
        # What the utilization target leaves after everything in use now (our weights included)
        # and the activations of the largest step, measured by running one, and of the largest
        # prefill graph, whose memory pool is the graphs' own.
        peak = sum(profile_activation_bytes(model, self.model_config, tokens, self.dtype,
                                            self.device)
                   for tokens in (c.max_num_batched_tokens, self.prefill_graph_tokens) if tokens)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * c.gpu_memory_utilization - (total - free) - peak
        log.info("GPU memory: %.1f GiB in use, %.2f GiB peak activations (steps of %d tokens, "
                 "prefill graphs of %d), %.1f GiB left for the KV cache at utilization %.2f",
                 (total - free) / 2**30, peak / 2**30, c.max_num_batched_tokens,
                 self.prefill_graph_tokens, max(budget, 0) / 2**30,
                 c.gpu_memory_utilization)
        return max(budget, 0)

    # ---- requests in and out -------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(type(t) is int for t in prompt):  # bool and other int subclasses are out
            raise InvalidParameter("prompt", "must be a string or a list of token ids")
        vocab = self.model_config.vocab_size
        if prompt and (min(prompt) < 0 or max(prompt) >= vocab):
            bad = [t for t in prompt if not 0 <= t < vocab]
            raise InvalidParameter("prompt", f"token ids {bad[:5]} are outside [0, {vocab})")
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    stream: bool = True) -> None:
        """Queue a request; errors (empty or too-long prompt) are raised before anything is queued.
        With stream=False, step() reports the request only once it has finished."""
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if request_id in self.groups or any(c in self.samples for c in child_ids):
            raise InvalidParameter("request_id", f"{request_id!r} is already running")
        ids = self.encode_prompt(prompt)
        if not ids:
            raise InvalidParameter("prompt", "the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), self.max_model_len)
        samples = []
        for i, child_id in enumerate(child_ids):
            seed = None if params.seed is None else params.seed + i
            req = Request(child_id, ids, params, self.eos_token_ids, seed)
            samples.append(_Sample(req, request_id, i, Detokenizer(self.tokenizer, ids, params)))
        self.groups[request_id] = _Group(request_id, prompt if isinstance(prompt, str) else None,
                                         samples, stream)
        for s in samples:
            self.samples[s.request.request_id] = s
            self.scheduler.add(s.request)

    def abort_request(self, request_id: str) -> None:
        group = self.groups.get(request_id)
        if group is None:
            return
        for s in group.samples:
            if not s.request.is_finished:
                self._finish(s.request, "abort")
        self._forget(group)

    def _forget(self, group: _Group) -> None:
        del self.groups[group.request_id]
        for s in group.samples:
            del self.samples[s.request.request_id]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.inflight is not None

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that made progress.

        Pipelined: a step's tokens are sampled on the device and read back during the next call,
        so its outputs arrive one call later (a final call with nothing to schedule hands over the
        last ones). With async scheduling the next batch is even planned and queued before the
        last tokens are read: the GPU takes them from its own memory and never waits on Python."""
        start = time.perf_counter()
        outputs = [] if self.async_scheduling else self._resolve()
        batch = self.scheduler.schedule()
        result = None
        if batch:
            pending = self.inflight.device_tokens if self.inflight else None
            result = self.runner.execute(batch, pending)  # queued on the device, not awaited
            for req, n in zip(batch.requests, batch.num_new):
                req.num_computed_tokens += n
        if self.async_scheduling:
            outputs = self._resolve()
        if result is None:
            return outputs
        for pl in result.prompt_logits:
            self._add_prompt_logprobs(pl.request, pl.logits, pl.first_target)
        self.inflight = self._sample(batch, result)
        if self.profiler is not None:
            self._profile(batch, result, time.perf_counter() - start)
        return outputs

    def _profile(self, batch: Batch, result: StepOutput, seconds: float) -> None:
        """The step's (new tokens, context) per sequence and rows through the LM head, to the
        profiler. A request that finished in the step has had its blocks freed
        (num_computed_tokens back to 0): it computed every token but the one it just sampled."""
        seqs = [(n, req.num_tokens - 1 if req.is_finished else req.num_computed_tokens)
                for req, n in zip(batch.requests, batch.num_new)]
        rows = len(result.sample_requests) + sum(p.logits.shape[0] for p in result.prompt_logits)
        self.profiler.record(seqs, rows, batch.num_decodes, seconds)

    def _sample(self, batch: Batch, result: StepOutput) -> _InFlight:
        """Queue sampling for the batch's requests that are still live; each gets a PENDING token."""
        live = [i for i, r in enumerate(result.sample_requests) if not r.is_finished]
        reqs = [result.sample_requests[i] for i in live]
        sampled = None
        if reqs:
            logits, argmax, graph = result.sample_logits, result.sample_argmax, result.sample_graph
            if len(live) < len(result.sample_requests):  # finished while this step was queued
                rows = to_device(live, torch.long, logits.device)
                logits = logits.index_select(0, rows)
                argmax = argmax.index_select(0, rows) if argmax is not None else None
                graph = None
            sampled = self.sampler(logits, reqs, argmax, graph)
            for r in reqs:
                r.token_ids.append(PENDING)
        groups = dict.fromkeys(self.samples[r.request_id].group_id for r in batch.requests
                               if r.request_id in self.samples)
        return _InFlight(list(batch.requests), reqs, sampled, list(groups))

    def _resolve(self) -> list[RequestOutput]:
        """Read back the last step's tokens, apply them (stops, limits, prefix cache) and build
        the outputs of the requests it advanced."""
        step, self.inflight = self.inflight, None
        if step is None:
            return []
        if step.sampled is not None:
            tokens, logprobs = step.sampled.resolve()
            for req, token, lp in zip(step.sampled_requests, tokens, logprobs):
                if not req.is_finished:  # not aborted meanwhile
                    self._append_token(req, token, lp)
        for req in step.requests:
            if not req.is_finished:
                self.kv.cache_computed_blocks(req)
        outputs = []
        for gid in step.groups:
            group = self.groups.get(gid)
            if group is None:  # aborted
                continue
            if group.stream or group.finished:
                outputs.append(self._output(group))
            if group.finished:
                self._forget(group)
        return outputs

    def _append_token(self, req: Request, token: int, logprob) -> None:
        """Put a sampled token in its PENDING place, then check for stops and limits."""
        req.token_ids[-1] = token
        if logprob is not None:
            req.logprobs.append(logprob)
        p, n_out = req.params, req.num_output_tokens
        sample = self.samples[req.request_id]
        if not p.stop:
            sample.undecoded.append(token)  # no stop string to look for: decode it later
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return self._finish(req, "stop")
            if token in p.stop_token_ids:
                return self._finish(req, "stop", token)
        if p.stop:
            stop = sample.detok.add(token, check_stop=n_out >= p.min_tokens)
            if stop is not None:
                return self._finish(req, "stop", stop)
        if (p.max_tokens is not None and n_out >= p.max_tokens) or req.num_tokens >= self.max_model_len:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, stop_reason=None) -> None:
        req.finish(reason, stop_reason)
        self.scheduler.finish(req)

    def _add_prompt_logprobs(self, req: Request, logits: torch.Tensor, first: int) -> None:
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)  # the first prompt token has no context
        known = max(len(req.prompt_logprobs) - first, 0)  # rows recomputed after a preemption
        if known >= logits.shape[0]:
            return
        logits, first = logits[known:], first + known
        targets = to_device(req.token_ids[first:first + logits.shape[0]], torch.long, logits.device)
        req.prompt_logprobs.extend(token_logprobs(logits, targets, req.params.prompt_logprobs))

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for s in group.samples:
            for token in s.undecoded:
                s.detok.add(token, check_stop=False)
            s.undecoded.clear()
            r = s.request
            tokens = r.output_token_ids
            outputs.append(CompletionOutput(
                index=s.index, text=s.detok.text, token_ids=list(tokens),
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                logprobs=list(r.logprobs) if r.params.logprobs is not None else None,
                delta_text=s.detok.take_delta(r.is_finished),
                delta_token_ids=tokens[s.sent_tokens:]))
            s.sent_tokens = len(tokens)
        first = group.samples[0].request
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids, outputs=outputs, finished=group.finished,
            prompt_logprobs=first.prompt_logprobs if first.wants_prompt_logprobs else None,
            num_cached_tokens=first.num_cached_tokens)

    @property
    def prefix_cache_stats(self):
        return self.pool.stats

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions


__all__ = ["LLMEngine", "Status"]
