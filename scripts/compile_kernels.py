"""Compile every Triton kernel for Hopper (sm_90) without a GPU, as the engine launches them for the
Llama-3.1-8B and SmolLM2 shapes (1 and 8 rows, with programmatic dependent launch), and print each
one's registers, spills and SASS size: a compile error or a new spill shows before a GPU run.

    python scripts/compile_kernels.py

Needs Triton (its wheel carries ptxas and cuobjdump); no CUDA driver. A stand-in driver tells
Triton the target, and every `kernel[grid](...)` compiles (Triton's warm-up) instead of launching.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, intermediate, heads, kv heads, head dim, vocabulary
    "llama3-8b": (4096, 14336, 32, 8, 128, 128256),
    "smollm2": (576, 1536, 9, 3, 64, 49152),
}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
WHERE = {"model": "?", "launch": "?"}  # what the engine is launching now, for the table


class Hopper:
    """The driver Triton asks for a target: an H100's, with no device behind it."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def compile_launches(log: list) -> None:
    """kernel[grid](...) compiles the kernel for these arguments and launches nothing."""
    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            log.append((f"{WHERE['model']}: {WHERE['launch']}", self.fn.__name__, kernel))
            return kernel
        return launch
    JITFunction.__getitem__ = getitem


def resources(kernel) -> tuple[int, int, int]:
    """Registers per thread, local-memory stack bytes (spills) and SASS instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([BIN / "nvdisasm", "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return regs, stack, len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))


def launch_all() -> None:
    """One decode step's kernels per shape and row count, with the launch shapes the H100's and
    the H200's traits choose; prefill attention, Qwen3's q/k-norm rope kernel and the sampling
    kernels."""
    from tuili import kernels
    from tuili.kernels import triton_attention, triton_gemv, triton_rope, tuning

    for module in (triton_attention, triton_gemv, triton_rope):
        module.pdl = lambda t: True
    for gpu, (name, shape) in itertools.product((tuning.H100, tuning.H200), SHAPES.items()):
        # The tensors are the CPU's, whose traits are the H100's: each card's are put in place.
        triton_gemv.gpu_traits = lambda device=None: gpu
        decode_step(name, shape, gpu.name.removeprefix("NVIDIA ").split()[0])
    triton_gemv.gpu_traits = tuning.gpu_traits
    for name, shape in SHAPES.items():
        prefill_attention(name, shape)
    qk_norm_rope()
    fp8_kv_cache()
    quantized_linears()
    fused_moe()
    assert kernels.num_sms(torch.device("cpu")) == tuning.H100.sms


def decode_step(name: str, shape: tuple, card: str) -> None:
    from tuili.kernels import (triton_attention, triton_bitmask, triton_gemv, triton_rope,
                               triton_sampling)
    from tuili.layers.rotary import RotaryEmbedding

    bf = torch.bfloat16
    hidden, inter, heads, kvh, d, vocab = shape
    rope = RotaryEmbedding(d, 256, 5e5, None, bf, torch.device("cpu"))
    caches = [torch.zeros(64, 16, kvh, d, dtype=bf) for _ in range(2)]
    qkv_w = torch.empty((heads + 2 * kvh) * d, hidden, dtype=bf)
    weights = dict(o=torch.empty(hidden, heads * d, dtype=bf),
                   gate_up=torch.empty(2 * inter, hidden, dtype=bf),
                   down=torch.empty(hidden, inter, dtype=bf),
                   lm_head=torch.empty(vocab, hidden, dtype=bf))
    norm = torch.ones(hidden, dtype=bf)
    for m in (1, 8):
        x = torch.zeros(m, hidden, dtype=bf)
        sums = torch.ones(m, 4, dtype=torch.float32)
        ids = torch.arange(m)
        WHERE["model"] = f"{name} ({card}), {m} row{'s' if m > 1 else ''}"
        WHERE["launch"] = "qkv"
        qkv = triton_gemv.gemv(x, qkv_w, norm_weight=norm, eps=1e-5, sumsq=sums)
        WHERE["launch"] = "rope + KV store"
        q = triton_rope.rope_and_store(qkv.view(m, -1, d), ids, rope.cos, rope.sin, *caches,
                                       ids, heads)
        lens = torch.full((m,), 300)
        tables = torch.zeros(m, 19, dtype=torch.long)
        WHERE["launch"] = "decode attention"
        attn = triton_attention.decode_attention(q, *caches, tables, lens, d ** -0.5)
        WHERE["launch"] = "o + residual"
        triton_gemv.gemv(attn.view(m, -1), weights["o"], residual=x, want_sumsq=True)
        if triton_gemv.default_config(m, inter, hidden, False, True):
            WHERE["launch"] = "gate_up + SiLU"
            act = triton_gemv.gemv(x, weights["gate_up"], norm_weight=norm, eps=1e-5,
                                   gated=True, sumsq=sums)
            WHERE["launch"] = "down + residual"
            triton_gemv.gemv(act, weights["down"], residual=x, want_sumsq=True)
        if triton_gemv.default_config(m, vocab, hidden):
            WHERE["launch"] = "lm_head"
            triton_gemv.gemv(x, weights["lm_head"], norm_weight=norm, eps=1e-5, sumsq=sums)
        WHERE["launch"] = "argmax"
        triton_sampling.argmax(torch.zeros(m, vocab, dtype=bf))
        WHERE["launch"] = "argmax, also into the graph's input ids"
        triton_sampling.argmax(torch.zeros(m, vocab, dtype=bf),
                               also=torch.zeros(m, dtype=torch.long))
        WHERE["launch"] = "sample: candidates, then the race"
        f, i = torch.ones(m), torch.ones(m, dtype=torch.long)
        triton_sampling.sample(torch.zeros(m, vocab, dtype=bf), i, f, i * 50, f * 2, f * 0, i,
                               1024)
        WHERE["launch"] = "sample: the race alone (no filters)"
        triton_sampling.sample(torch.zeros(m, vocab, dtype=bf), i, f, i * vocab, f * 2, f * 0,
                               i, 1)
        mask = torch.zeros(m, (vocab + 31) // 32, dtype=torch.int32)
        for dtype in (bf, torch.float32):  # eager (the logits' dtype) and the masked graphs
            WHERE["launch"] = f"structured-output bitmask ({str(dtype).removeprefix('torch.')})"
            triton_bitmask.apply_bitmask(torch.zeros(m, vocab, dtype=dtype), mask)


def prefill_attention(name: str, shape: tuple) -> None:
    from tuili.kernels import triton_attention

    bf = torch.bfloat16
    _, _, heads, kvh, d, _ = shape
    caches = [torch.zeros(64, 16, kvh, d, dtype=bf) for _ in range(2)]
    n = 300
    WHERE.update(model=f"{name}, a {n}-token prompt", launch="prefill attention")
    q = torch.zeros(n, heads, d, dtype=bf)
    seqs = torch.tensor([[0], [n], [0]], dtype=torch.int32)
    triton_attention.prefill_attention(q, *caches, torch.zeros(1, 19, dtype=torch.long), seqs,
                                       n, d ** -0.5, torch.empty_like(q))


def qk_norm_rope() -> None:
    from tuili.kernels import triton_rope
    from tuili.layers.rotary import RotaryEmbedding

    bf = torch.bfloat16
    WHERE.update(model="qwen3-0.6b, 5 rows", launch="q/k norm + rope + KV store")
    qkv = torch.zeros(5, 16 + 2 * 8, 128, dtype=bf)
    rope = RotaryEmbedding(128, 256, 1e6, None, bf, torch.device("cpu"))
    caches = [torch.zeros(4, 16, 8, 128, dtype=bf) for _ in range(2)]
    ids = torch.arange(5)
    w = torch.ones(128, dtype=bf)
    triton_rope.rope_and_store(qkv, ids, rope.cos, rope.sin, *caches, ids, 16, (w, w), 1e-6)


def fp8_kv_cache() -> None:
    """The FP8 KV cache's launches at Llama-3.1-8B's shape: the stores, decode attention at 1
    and 8 rows (split and not), prefill attention."""
    from tuili.kernels import triton_attention, triton_rope
    from tuili.layers.rotary import RotaryEmbedding

    bf, heads, kvh, d = torch.bfloat16, 32, 8, 128
    caches = [torch.zeros(64, 16, kvh, d, dtype=torch.float8_e4m3fn) for _ in range(2)]
    scales = [torch.ones(kvh) for _ in range(2)]
    rope = RotaryEmbedding(d, 256, 5e5, None, bf, torch.device("cpu"))
    for m in (1, 8):
        WHERE["model"] = f"llama3-8b, FP8 KV cache, {m} row{'s' if m > 1 else ''}"
        ids = torch.arange(m)
        WHERE["launch"] = "rope + KV store"
        q = triton_rope.rope_and_store(torch.zeros(m, heads + 2 * kvh, d, dtype=bf), ids,
                                       rope.cos, rope.sin, *caches, ids, heads, None, 0.0,
                                       *scales)
        WHERE["launch"] = "KV store"
        kv = torch.zeros(m, kvh, d, dtype=bf)
        triton_attention.store_kv(kv, kv, *caches, ids, *scales)
        WHERE["launch"] = "decode attention"
        triton_attention.decode_attention(q, *caches, torch.zeros(m, 19, dtype=torch.long),
                                          torch.full((m,), 300), d ** -0.5, k_scale=scales[0],
                                          v_scale=scales[1])
    n = 300
    WHERE.update(model=f"llama3-8b, FP8 KV cache, a {n}-token prompt", launch="prefill attention")
    q = torch.zeros(n, heads, d, dtype=bf)
    triton_attention.prefill_attention(q, *caches, torch.zeros(1, 19, dtype=torch.long),
                                       torch.tensor([[0], [n], [0]], dtype=torch.int32), n,
                                       d ** -0.5, torch.empty_like(q), k_scale=scales[0],
                                       v_scale=scales[1])


def quantized_linears() -> None:
    """The quantized layers' kernels (kernels/triton_quant.py) on Llama-3.1-8B's gate_up and down
    shapes: the decode GEMVs at 1 and 8 rows, plain and with the decode step's fusions (gate_up:
    the norm from the sums of squares and SiLU; down: the residual add, leaving the sums), and
    the 4-bit dequantize of larger steps."""
    from tuili.kernels import triton_quant

    bf = torch.bfloat16
    hidden, inter = SHAPES["llama3-8b"][:2]
    for n, k in ((2 * inter, hidden), (hidden, inter)):
        qweight = torch.zeros(k // 8, n, dtype=torch.int32)
        scales = torch.zeros(k // 128, n, dtype=torch.float16)
        gate_up = n == 2 * inter
        for m in (1, 8):
            x = torch.zeros(m, k, dtype=bf)
            fused = (dict(norm_weight=torch.ones(k, dtype=bf), eps=1e-5, gated=True,
                          sumsq=torch.zeros(m, 32)) if gate_up else
                     dict(residual=torch.zeros(m, n, dtype=bf), want_sumsq=True))
            label = "norm + SiLU" if gate_up else "residual + sums"
            WHERE.update(model=f"llama3-8b [{n}, {k}], {m} row{'s' if m > 1 else ''}",
                         launch="int4 GEMV (g128)")
            triton_quant.int4_gemv(x, qweight, scales, scales, 128)
            WHERE["launch"] = f"int4 GEMV (g128), {label}"
            triton_quant.int4_gemv(x, qweight, scales, scales, 128, **fused)
            for dtype in (torch.int8, torch.float8_e4m3fn):
                WHERE["launch"] = f"{str(dtype).removeprefix('torch.')} GEMV"
                w = torch.zeros(n, k, dtype=dtype)
                triton_quant.scaled_gemv(x, w, torch.ones(n, dtype=bf))
                WHERE["launch"] += f", {label}"
                triton_quant.scaled_gemv(x, w, torch.ones(n, dtype=bf), **fused)
        WHERE.update(model=f"llama3-8b [{n}, {k}]", launch="int4 dequantize (large steps)")
        triton_quant.int4_dequantize(qweight, scales, scales, 128, bf)


def fused_moe() -> None:
    """The MoE grouped GEMMs (kernels/triton_moe.py) on Qwen3-30B-A3B's experts, with the tiles
    chosen for decode (1 and 8 tokens), a batch of 64 and a 512-token prefill."""
    from tuili.kernels import triton_moe

    bf = torch.bfloat16
    hidden, inter, experts, top_k = 2048, 768, 128, 8
    w13 = torch.zeros(experts, 2 * inter, hidden, dtype=bf)
    w2 = torch.zeros(experts, hidden, inter, dtype=bf)
    for m in (1, 8, 64, 512):
        WHERE.update(model=f"qwen3-30b-a3b, {m} token{'s' if m > 1 else ''}",
                     launch="MoE gate_up + SiLU, down x weight")
        ids = torch.arange(m * top_k).remainder(experts).view(m, top_k)
        triton_moe.fused_moe(torch.zeros(m, hidden, dtype=bf), w13, w2,
                             torch.ones(m, top_k), ids)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    driver.set_active(Hopper())
    log: list = []
    compile_launches(log)
    launch_all()
    seen = {}
    for where, name, kernel in log:
        seen.setdefault(kernel.hash, (where, name, kernel))
    print(f"{'launch':<58} {'kernel':<20} {'warps':>5} {'regs':>5} {'spill B':>7} {'SASS':>6}")
    for where, name, kernel in seen.values():
        regs, stack, sass = resources(kernel)
        print(f"{where:<58} {name:<20} {kernel.metadata.num_warps:5d} {regs:5d} {stack:7d} "
              f"{sass:6d}")
    print(f"compiled {len(seen)} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
