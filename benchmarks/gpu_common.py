"""Shared by the GPU benchmarks: the measured ceilings and the byte/FLOP counts of a model."""

from __future__ import annotations

import time

import torch


def cuda_time(fn, repeat: int = 20, warmup: int = 3, graph: bool = False) -> float:
    """Median seconds of fn() on the GPU, timed with CUDA events. graph=True captures fn in a
    CUDA graph and times replays, so a short kernel's CPU launch cost is left out."""
    for _ in range(warmup):
        fn()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure_ceilings() -> dict:
    """Read bandwidth (a 4 GiB bf16 sum) and bf16 matmul rate (8192^3 GEMM) on this GPU."""
    read = _read_bandwidth(torch.ones(2**31, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.empty_cache()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    flops = 2 * 8192**3 / cuda_time(lambda: a @ b, repeat=10)
    return {"read_bytes_per_s": read, "matmul_flops_per_s": flops}


def _read_bandwidth(x: torch.Tensor) -> float:
    return x.numel() * x.element_size() / cuda_time(lambda: x.sum(dtype=torch.float32), repeat=10)


def linear_params(model) -> int:
    """Parameters of every matmul weight a token passes through (embedding table excluded; the LM
    head counted, tied or not)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not embed and p is not head)
    return n + head.numel()


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def attention_flops(config, new: int, context: int) -> float:
    """QK^T and PV FLOPs for `new` causal tokens after `context` cached ones, all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = new * context + new * (new + 1) / 2
    return 4 * pairs * head_dim * config.num_attention_heads * config.num_hidden_layers


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()
