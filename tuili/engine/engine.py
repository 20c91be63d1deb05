"""LLMEngine: step() = schedule -> run -> sample -> update. The only loop."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from tuili.config import EngineConfig
from tuili.distributed.group import SINGLE
from tuili.engine.cuda_graphs import PREFILL_SEQS
from tuili.engine.kv_cache import BlockPool, KVCacheManager, PrefixCacheStats
from tuili.engine.memory import plan_kv_cache, plan_state_slots
from tuili.engine.output import OutputProcessor
from tuili.engine.pooling_output import PoolingOutputProcessor, PoolingRequestOutput
from tuili.engine.pooling_setup import check_pooling_request, choose_task
from tuili.engine.request import Request, Status
from tuili.engine.request_checks import ParamsCheck, encode_prompt
from tuili.engine.runner import DeviceTokens, ModelRunner, StepOutput
from tuili.engine.sampler import SampledTokens, Sampler
from tuili.engine.scheduler import Batch, Scheduler
from tuili.engine.spec_decode.setup import make_speculator
from tuili.engine.state_cache import StateSlots, hybrid_config, state_layers
from tuili.engine.transfer import to_device
from tuili.errors import InvalidParameter, PromptTooLong, WrongTask
from tuili.kernels import HAS_TRITON
from tuili.layers import kv_quant
from tuili.layers.linear import Int4CpuMethod
from tuili.quantization import weight_format
from tuili.quantization.gguf import PACKED_MAX_ROWS as GGUF_PACKED_ROWS
from tuili.quantization.int8 import Int8HeadMethod
from tuili.models import loader
from tuili.models.pooler import Pooler
from tuili.outputs import RequestOutput
from tuili.pooling_params import PoolingParams
from tuili.sampling_params import SamplingParams

log = logging.getLogger("tuili")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a pooling request's Request carries as its params (read-only: nothing is sampled); one
# instance, not one validated per request.
_NO_SAMPLING = SamplingParams(max_tokens=1)


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
class _InFlight:
    """A step whose sampled tokens are not read back yet."""
    batch: Batch
    sampled_requests: list[Request]  # those that sampled a token (each has one pending)
    sampled: SampledTokens | None
    groups: list[str]  # the groups it advanced, in batch order
    verified: list = field(default_factory=list)  # (request, spec_decode Verified), read back

    @property
    def device_tokens(self) -> DeviceTokens | None:
        if self.sampled is None:
            return None
        return DeviceTokens(self.sampled.tokens,
                            {r.request_id: i for i, r in enumerate(self.sampled_requests)})


def device_defaults(config: EngineConfig, device: torch.device) -> EngineConfig:
    """GPU steps are cheap per token up to several thousand and per sequence up to hundreds
    (BENCHMARKS.md, eleventh session); CPU steps are not."""
    gpu = device.type == "cuda"
    return replace(
        config, max_num_batched_tokens=config.max_num_batched_tokens or (8192 if gpu else 1024),
        max_num_seqs=config.max_num_seqs or (256 if gpu else 64))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        config = self.config = device_defaults(config, self.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        start = time.perf_counter()
        # An engine dropped after an earlier engine's start-up sits in the generation that
        # start-up froze (below), where no collection reaches its cycles: unfreeze and collect
        # before this one measures the memory it may take (each SmolLM2 engine of a test process
        # leaked ~400 MB, until the CI's workers were killed for memory).
        gc.unfreeze()
        gc.collect()
        self.ranks = None  # tensor parallelism: the other ranks (distributed/launch.py)
        if config.tensor_parallel_size > 1:
            from tuili.distributed.launch import Ranks, rank_device

            from tuili.distributed.group import rank_threads

            self.device = rank_device(self.device, 0)
            if self.device.type == "cpu" and not config.num_threads:
                torch.set_num_threads(rank_threads(config.tensor_parallel_size))
            self.ranks = Ranks(config, self.device)
        try:
            self._build(config, start)
        except BaseException:
            if self.ranks is not None:
                self.ranks.abort()
            raise

    def _build(self, config: EngineConfig, start: float) -> None:
        tp = self.ranks.tp if self.ranks is not None else SINGLE
        loaded = loader.load(config.model, self.dtype, self.device, config.revision,
                             config.quantization, config.quantize_lm_head, tp)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.generation_config = loaded.generation_config
        self.eos_token_ids = frozenset(loaded.config.eos_token_ids)
        self.task, self.pooling_config, config = choose_task(config, loaded)
        self.config = config
        self.pooler = Pooler(loaded.model, self.pooling_config) if self.pooling_config else None
        hybrid = bool(state_layers(loaded.model))  # recurrent states beside the KV cache
        if hybrid:
            config = self.config = hybrid_config(config, self.device)
        # CUDA graphs: decode batches up to max_num_seqs, prefill steps up to this many tokens.
        eager = config.enforce_eager or not HAS_TRITON or self.device.type != "cuda"
        self.prefill_graph_tokens = 0 if eager else min(config.max_prefill_graph_tokens,
                                                        config.max_num_batched_tokens)
        # An encoder keeps no KV cache between steps: nothing to quantize, no blocks to hold.
        encoder = getattr(loaded.model, "is_encoder", False)
        self.kv_dtype = self.dtype if encoder else \
            kv_quant.cache_dtype(config.kv_cache_dtype, self.dtype)
        slots, slot_bytes = plan_state_slots(config, self.model_config, loaded.model, self.dtype,
                                             self.device, self.prefill_graph_tokens)
        if hybrid and slots < config.max_num_seqs:
            log.info("max_num_seqs lowered from %d to the %d recurrent-state slots that fit",
                     config.max_num_seqs, slots)
            config = self.config = replace(config, max_num_seqs=slots)
        num_blocks, self.max_model_len = plan_kv_cache(config, self.model_config, loaded.model,
                                                       self.dtype, self.device,
                                                       self.prefill_graph_tokens, tp, self.kv_dtype,
                                                       slots * slot_bytes)
        kv_scales = None
        if self.kv_dtype != self.dtype:
            kv_scales = kv_quant.prepare_scales(loaded.model, self.model_config, loaded.kv_scales,
                                                self.tokenizer.encode, self.dtype, self.device, tp)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        snapshots = slots if config.enable_prefix_caching else 0  # see plan_state_slots
        self.kv = KVCacheManager(self.pool, StateSlots(slots, snapshots) if slots else None)
        self.speculator = make_speculator(config, self.model_config, self.tokenizer,
                                          self.max_model_len, num_blocks, self.dtype, self.device,
                                          loaded.model, eager)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len, self.speculator,
                                   pooling_blocks=not encoder)
        self.runner = ModelRunner(loaded.model, self.model_config, num_blocks, config.block_size,
                                  self.max_model_len, self.dtype, self.device,
                                  0 if eager else config.max_num_seqs, self.prefill_graph_tokens,
                                  self.pooler, self.ranks.channel if self.ranks else None,
                                  self.kv_dtype, kv_scales, slots, state_snapshots=snapshots)
        self.sampler = Sampler(config.seed, self.device)
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        if self.speculator is not None:  # proposals need every request's last token read back
            self.async_scheduling = False
        self.output = OutputProcessor(self.tokenizer)
        self.pooling_output = PoolingOutputProcessor(
            self.pooling_config.normalize if self.pooling_config else False)
        self.inflight: _InFlight | None = None  # the last step, its tokens not read back yet
        self.checks = ParamsCheck(self.tokenizer, self.model_config.vocab_size,
                                  self.eos_token_ids)
        self.failures: list[tuple[str, BaseException]] = []  # see take_failures
        self.profiler = None
        if self.device.type == "cuda" and HAS_TRITON and self.task == "generate":
            self._warm_up()
        if config.profile:
            from tuili.analysis.profiler import PhaseProfiler

            int4_rows = Int4CpuMethod.MAX_ROWS if loaded.quantization == "int4" else 0
            kv = "fp8" if self.kv_dtype == kv_quant.FP8 else None  # the bytes attention reads
            head = getattr(loaded.model, "lm_head", None)
            head_rows = Int8HeadMethod.MAX_ROWS \
                if isinstance(getattr(head, "method", None), Int8HeadMethod) else 0
            self.profiler = PhaseProfiler.for_run(self.model_config, str(self.dtype), self.device,
                                                  int4_rows, weight_format(loaded.quantization),
                                                  kv=kv, int8_head_rows=head_rows)
            # GGUF blocks on the GPU: read packed by the GEMV and the tiled GEMM, dequantized
            # to 16 bits (written, then read by cuBLAS) in larger steps.
            if loaded.bits_per_weight and self.device.type == "cuda":
                bits = loaded.bits_per_weight
                self.profiler = PhaseProfiler.for_run(
                    self.model_config, str(self.dtype), self.device, GGUF_PACKED_ROWS,
                    f"gguf-{bits + 32:.4f}", small_weights=f"gguf-{bits:.4f}", kv=kv)
        # What start-up built (modules, the model, its graphs) is never scanned by the collector
        # again: a full collection over it stalled 256-sequence decode steps by ~120 ms (H200,
        # BENCHMARKS.md, issue 19).
        gc.collect()
        gc.freeze()
        weights = "weights" if loaded.quantization == "none" else f"{loaded.quantization} weights"
        log.info("loaded %s (%s, %s %s, %s) in %.1fs", loaded.source, self.model_config.architecture,
                 str(self.dtype).removeprefix("torch."), weights, self.device,
                 time.perf_counter() - start)

    def _warm_up(self) -> None:
        """Run requests of each kind end to end before any user's (an eager prefill of more
        prompts than a prefill graph holds, graph prefills, graph decodes; greedy, top-p, top-k
        and min-p rows), so that the kernels launched outside the captured graphs compile now:
        on an H200 the first requests after start-up otherwise waited on Triton compilations
        (BENCHMARKS.md, "Measurements behind the code")."""
        kinds = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                 SamplingParams(max_tokens=3, top_p=0.9, ignore_eos=True, seed=0),
                 SamplingParams(max_tokens=3, top_k=5, ignore_eos=True, seed=0),
                 SamplingParams(max_tokens=3, min_p=0.1, ignore_eos=True, seed=0)]
        vocab = self.model_config.vocab_size
        # Prefill steps of 1, 2, 3 and 5 prompts: the LM head's GEMV over their sampled rows
        # compiles once per power-of-two row count (each took 0.35-0.7 s on first use).
        for wave, count in enumerate((PREFILL_SEQS + 2, 1, 2, 3, 5)):
            for i in range(count):
                prompt = [(7 * i + j) % vocab for j in range(1 + 5 * i)]
                self.add_request(f"warm-up-{wave}-{i}", prompt, kinds[i % len(kinds)],
                                 stream=False)
            while self.has_unfinished_requests():
                self.step()
        # One step that fills the whole token budget: the first such step after start-up took
        # 331 ms against 190 ms for each later one (8B shape, 8192 tokens, H200; BENCHMARKS.md,
        # fourteenth session), growing the allocator's pool and cuBLAS's choices at that size.
        budget = min(self.scheduler.budget, self.pool.num_blocks * self.config.block_size // 2)
        longest = max(1, self.max_model_len - 4)
        for i in range(-(-budget // longest)):
            size = min(longest, budget - i * longest)
            self.add_request(f"warm-up-full-{i}", [(11 * i + j) % vocab for j in range(size)],
                             kinds[0], stream=False)
        while self.has_unfinished_requests():
            self.step()
        self.pool.reset_prefix_cache()
        self.pool.stats = PrefixCacheStats()
        if self.speculator is not None:
            self.speculator.reset_stats()

    # ---- requests in and out -------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, prompt)

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone (request_checks.ParamsCheck)."""
        self.checks(params)

    @property
    def grammars(self):
        """The structured-output matchers (tuili.structured.matchers.GrammarMatchers)."""
        return self.checks.grammars

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | PoolingParams, stream: bool = True) -> None:
        """Queue a request; errors (empty or too-long prompt) are raised before anything is queued.
        With stream=False, step() reports the request only once it has finished."""
        if isinstance(params, PoolingParams):
            return self._add_pooling(request_id, prompt, params)
        if self.task != "generate":
            raise WrongTask(self.task, "generate")
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if self.output.is_running(request_id, child_ids):
            raise InvalidParameter("request_id", f"{request_id!r} is already running")
        self.checks(params, compile=False)  # a new grammar compiles off the loop (below)
        ids = self.encode_prompt(prompt)
        if not ids:
            raise InvalidParameter("prompt", "the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(len(ids), self.max_model_len)
        requests = [Request(child_id, ids, params, self.eos_token_ids,
                            None if params.seed is None else params.seed + i)
                    for i, child_id in enumerate(child_ids)]
        self.output.add(request_id, prompt if isinstance(prompt, str) else None, requests, stream)
        for req in requests:
            # a request whose grammar compiles waits for it outside the scheduler (_admit)
            if params.structured_outputs is None or self.grammars.add(req):
                self.scheduler.add(req)

    def _add_pooling(self, request_id: str, prompt: str | list[int], params: PoolingParams) -> None:
        if params.task != self.task:
            raise WrongTask(self.task, params.task)
        if self.output.is_running(request_id, [request_id]) or \
                self.pooling_output.is_running(request_id):
            raise InvalidParameter("request_id", f"{request_id!r} is already running")
        ids = self.encode_prompt(prompt)
        check_pooling_request(prompt, ids, params, self.max_pooling_len, self.embedding_size)
        req = Request(request_id, ids, _NO_SAMPLING, self.eos_token_ids, pooling=params)
        self.pooling_output.add(req)
        self.scheduler.add(req)

    @property
    def embedding_size(self) -> int:
        """The width of a pooling model's embeddings (its last Dense module's, else hidden)."""
        hidden = self.model_config.hidden_size
        return self.pooling_config.embedding_size(hidden) if self.pooling_config else hidden

    @property
    def max_pooling_len(self) -> int:
        """The longest pooling prompt: it runs whole, in one step."""
        return min(self.max_model_len, self.config.max_num_batched_tokens)

    def abort_request(self, request_id: str) -> None:
        for req in self.pooling_output.abort(request_id):
            self.scheduler.finish(req, "abort")
        for req in self.output.abort(request_id):
            self.scheduler.finish(req, "abort")
            if (grammars := self.checks.made_grammars) is not None:
                grammars.remove(req)

    def has_unfinished_requests(self) -> bool:
        grammars = self.checks.made_grammars
        return (self.scheduler.has_unfinished() or self.inflight is not None
                or (grammars is not None and bool(grammars.compiling)))

    def take_failures(self) -> list[tuple[str, BaseException]]:
        """(request id, error) of the requests that failed since the last call (a grammar that
        did not compile in the background), each aborted already."""
        failures, self.failures = self.failures, []
        return failures

    def _admit_compiled(self) -> None:
        """Schedule the requests whose grammar finished compiling; fail those it refused."""
        grammars = self.checks.made_grammars
        if grammars is None or not grammars.compiling:  # (its truth is "has matchers")
            return
        for req, error in grammars.ready():
            if error is None:
                self.scheduler.add(req)
                continue
            group = self.output.group_ids([req])
            if group:  # its siblings (n > 1) go with it
                self.abort_request(group[0])
                self.failures.append((group[0], error))

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """Run one iteration; return an output for every request that made progress.

        Pipelined: a step's tokens are sampled on the device and read back during the next call,
        so its outputs arrive one call later (a final call with nothing to schedule hands over the
        last ones). With async scheduling the next batch is even planned and queued before the
        last tokens are read: the GPU takes them from its own memory and never waits on Python."""
        start = time.perf_counter()
        outputs = [] if self.async_scheduling else self._resolve()
        self._admit_compiled()
        batch = self.scheduler.schedule()
        result = None
        if batch:
            pending = self.inflight.device_tokens if self.inflight else None
            if self.ranks is None:
                result = self.runner.execute(batch, pending)  # queued on the device, not awaited
            else:
                result = self.ranks.execute(self.runner, batch, pending)
        if result is not None and result.tapped is not None:  # an EAGLE head's inputs
            self.speculator.observe(batch, result.tapped)
        if self.async_scheduling:
            outputs = self._resolve()
        if result is None:
            grammars = self.checks.made_grammars
            if not batch and grammars is not None and grammars.compiling:
                grammars.wait(0.01)  # only compiles are left: idle on them, do not spin
            return outputs
        for pl in result.prompt_logits:
            self.output.add_prompt_logprobs(pl.request, pl.logits, pl.first_target)
        if result.pooled_requests:
            outputs.extend(self._finish_pooled(result))
        if len(result.pooled_requests) < len(batch):  # else nothing is left to read back
            self.inflight = self._sample(batch, result)
        if self.profiler is not None:
            self._profile(batch, result, time.perf_counter() - start)
        return outputs

    def _finish_pooled(self, result: StepOutput) -> list[PoolingRequestOutput]:
        """Pooling requests end in the step that computes them: blocks freed, never cached."""
        outputs = self.pooling_output.outputs(result.pooled_requests, result.pooled)
        for req in result.pooled_requests:
            if not req.is_finished:
                self.scheduler.finish(req, "stop")
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
        """Queue sampling for the batch's requests that are still live; each gets a pending token."""
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
            # the grammar masks are filled here, on the host, while the device runs the step
            grammars = self.checks.made_grammars
            mask = grammars.step_mask(reqs, logits.device) if grammars else None
            sampled = self.sampler(logits, reqs, argmax, graph, mask)
            for r in reqs:
                r.num_pending += 1
        verified = []
        if result.verify_requests:  # read back now: the next step's drafts start from them
            found = self.speculator.verify(result.verify_logits, result.verify_requests,
                                           self.sampler.generator)
            verified = list(zip(result.verify_requests, found))
        return _InFlight(batch, reqs, sampled, self.output.group_ids(batch.requests), verified)

    def _resolve(self) -> list[RequestOutput]:
        """Read back the last step's tokens, apply them (stops, limits, prefix cache) and build
        the outputs of the requests it advanced."""
        step, self.inflight = self.inflight, None
        if step is None:
            return []
        tokens, logprobs = step.sampled.resolve() if step.sampled is not None else ([], [])
        self.scheduler.update(step.batch, step.sampled_requests, tokens, logprobs,
                              self.output.stop_string, step.verified)
        if grammars := self.checks.made_grammars:
            for req in grammars.accept(step.sampled_requests, tokens):
                self.scheduler.finish(req, "stop")  # the grammar is complete
        return self.output.outputs(step.groups)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one rank)."""
        if self.ranks is not None:
            self.ranks.shutdown()
            self.ranks = None

    @property
    def prefix_cache_stats(self):
        return self.pool.stats

    @property
    def spec_stats(self):
        """Speculative decoding's counters (spec_decode.speculator.SpecStats), or None."""
        return self.speculator.stats if self.speculator is not None else None

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions


__all__ = ["LLMEngine", "Status"]
