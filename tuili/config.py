"""EngineConfig: every engine option in one place, validated once at start-up.

The CLI builds its flags from these fields, so `tuili ... --flag` and `LLM(flag=...)` are one set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tuili.errors import InvalidParameter
from tuili.speculative_config import SpeculativeConfig

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
QUANTIZATIONS = ("auto", "none", "int4", "int8", "fp8", "gptq", "awq", "gguf")
TASKS = ("auto", "generate", "embed", "score")
POOLINGS = ("auto", "cls", "mean", "last")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    model: str = _opt(DEFAULT_MODEL, "model alias, local GGUF file, local HF folder or hub id")
    dtype: str = _opt("auto", "weights and activations dtype: auto (bfloat16 on GPU and on CPUs "
                              "with bf16 units, else float32), float32, bfloat16, float16")
    device: str = _opt("auto", "auto, cpu or cuda[:N]")
    quantization: str = _opt("auto", "auto: a checkpoint's own quantization_config (GPTQ, AWQ, "
                                     "FP8), a GGUF file's blocks kept packed on the GPU (Q8_0, "
                                     "Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) and its 4-bit weights when "
                                     "running bfloat16 on CPU; none: float weights in dtype; "
                                     "gguf: require a GGUF file's blocks kept packed; "
                                     "fp8, int8, int4: quantize float weights at load (int4 on a "
                                     "GGUF file: require its packed blocks); gptq, awq: require "
                                     "such a checkpoint")
    kv_cache_dtype: str = _opt("auto", "KV-cache dtype: auto (the model's dtype) or fp8 / "
                                       "fp8_e4m3 (float8 e4m3, half the bytes of bfloat16, with "
                                       "scales per layer and KV head: the checkpoint's k_scale / "
                                       "v_scale, else calibrated at start-up)")
    quantize_lm_head: bool | None = _opt(
        None, "the LM head in fewer bits. Unset: as the checkpoint has it (a GPTQ/AWQ/FP8 "
              "checkpoint's quantized head; a GGUF file whose head is stored quantized, as "
              "SmolLM2's Q8_0 embedding, runs it in int8 where its 4-bit layers run packed on "
              "CPU), else 16-bit; true: quantize it too (with fp8/int8/int4 at load, a GGUF's "
              "blocks on the GPU, int8 on the CPU's int4 path); false: 16-bit")
    task: str = _opt("auto", "what the model serves: auto (from its architecture and "
                             "sentence-transformers files), generate, embed or score")
    pooling: str = _opt("auto", "embed/score: how token states become one vector: auto (the "
                                "sentence-transformers files, else cls for encoders, last for "
                                "decoders), cls, mean or last")
    score_tokens: str | None = _opt(None, "score with a decoder: the 'no,yes' token pair whose "
                                          "last-token logits give the score (Qwen3-Reranker)")
    revision: str | None = _opt(None, "hub revision (branch, tag or commit) to download")
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the "
                                           "model's context length, capped by the KV cache)")
    block_size: int = _opt(16, "tokens per KV-cache block")
    kv_cache_memory_gb: float | None = _opt(None, "memory for the KV cache in GiB (default: 1 on "
                                                  "CPU; on GPU what gpu_memory_utilization leaves)")
    gpu_memory_utilization: float = _opt(0.9, "share of the GPU's memory tuili may use in all: "
                                              "weights, activations, then the KV cache")
    num_kv_blocks: int | None = _opt(None, "exact number of KV-cache blocks (overrides the budget)")
    max_num_seqs: int | None = _opt(None, "most sequences in one step (default: 256 on GPU, as "
                                          "vLLM; 64 on CPU)")
    max_num_batched_tokens: int | None = _opt(None, "most tokens computed in one step (default: "
                                                    "1024 on CPU, 8192 on GPU)")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of identical prompt prefixes")
    enable_chunked_prefill: bool = _opt(True, "split long prompts across steps")
    enforce_eager: bool = _opt(False, "on GPU, run every step eagerly, without CUDA graphs")
    max_prefill_graph_tokens: int = _opt(2048, "on GPU, steps with prefills of up to this many "
                                               "tokens and 8 sequences (decodes included) replay "
                                               "CUDA graphs; 0: eager")
    async_scheduling: bool | None = _opt(None, "plan and queue each step before the last step's "
                                               "tokens are read back (default: on for GPU, off "
                                               "for CPU, where it only adds a step per request)")
    engine_process: bool | None = _opt(None, "AsyncLLM and `tuili serve`: run the engine in a "
                                             "process of its own, so the HTTP side never waits "
                                             "for its GIL (default: on GPU)")
    speculative_config: str | dict | None = _opt(
        None, "speculative decoding, as JSON (vLLM's shape): {\"method\": \"ngram\", "
              "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4} or {\"model\": PATH, "
              "\"num_speculative_tokens\": 4}; \"disable_by_batch_size\": N turns it off for "
              "steps of more than N decodes")
    tensor_parallel_size: int = _opt(1, "split the model over this many processes (one per GPU "
                                        "on GPU, gloo on CPU); ranks 1..N-1 are spawned here, or "
                                        "started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR)")
    distributed_timeout_s: float = _opt(120.0, "tensor-parallel: seconds a collective waits for "
                                               "a rank before the engine stops with an error")
    seed: int = _opt(0, "seed for requests that give none")
    num_threads: int | None = _opt(None, "CPU threads for torch (default: torch's choice)")
    profile: bool = _opt(False, "profile each step: per-phase time, achieved bandwidth (MBU) and "
                                "FLOP/s (MFU) against the device's ceilings")

    def validate(self) -> EngineConfig:
        def need(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidParameter(name, f"got {getattr(self, name)!r}, must be {allowed}")

        need("task", self.task in TASKS, f"one of {', '.join(TASKS)}")
        need("pooling", self.pooling in POOLINGS, f"one of {', '.join(POOLINGS)}")
        need("score_tokens", self.score_tokens is None or len(self.score_tokens.split(",")) == 2,
             "two comma-separated words, e.g. no,yes")
        need("dtype", self.dtype in DTYPES, f"one of {', '.join(DTYPES)}")
        need("quantization", self.quantization in QUANTIZATIONS, f"one of {', '.join(QUANTIZATIONS)}")
        need("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"one of {', '.join(KV_CACHE_DTYPES)}")
        need("device", self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             "auto, cpu or cuda[:N]")
        need("block_size", self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
             "a power of two from 1 to 128")
        need("kv_cache_memory_gb", self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0,
             "> 0")
        need("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "in (0, 1]")
        need("num_kv_blocks", self.num_kv_blocks is None or self.num_kv_blocks >= 1, ">= 1")
        need("max_num_seqs", self.max_num_seqs is None or self.max_num_seqs >= 1, ">= 1")
        need("max_num_batched_tokens",
             self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1, ">= 1")
        need("max_model_len", self.max_model_len is None or self.max_model_len >= 2, ">= 2")
        need("max_prefill_graph_tokens", self.max_prefill_graph_tokens >= 0, ">= 0")
        need("num_threads", self.num_threads is None or self.num_threads >= 1, ">= 1")
        SpeculativeConfig.parse(self.speculative_config)  # raises what to change
        need("tensor_parallel_size", self.tensor_parallel_size >= 1, ">= 1")
        need("distributed_timeout_s", self.distributed_timeout_s > 0, "> 0")
        return self

    @classmethod
    def option_fields(cls):
        """The options, for building command-line flags."""
        return fields(cls)
