"""FLOPs and bytes of each operator of a Llama-family step, from the ModelConfig alone.

A step computes `new_tokens` tokens for each of its sequences, the last of which ends at
`context` (the token's own position included). Bytes count what an ideal kernel must move
between memory and the chip: every weight once per step, each sequence's K/V once per layer,
and each operator's activations in and out. Norms, rotary and residual adds are left out
(a few bytes per hidden value, well under 1% of a layer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tuili.analysis import mamba
from tuili.analysis.moe import mlp_params, mlp_step
from tuili.errors import InvalidParameter
from tuili.kernels.reference_gguf import TYPES as GGUF_TYPES
from tuili.kernels.reference_gguf import bits_per_weight
from tuili.models.config import ModelConfig

# Bits per stored weight, scales included.
WEIGHT_BITS = {
    "fp32": 32, "bf16": 16, "fp16": 16,
    "fp8": 8,     # one scale per tensor or channel: negligible
    "int8": 8,    # per-channel scales: negligible
    "int4": 4.25,  # 4-bit groups of 128 with a 16-bit scale and zero (GPTQ/AWQ-style)
    "int4-g32": 5,  # tuili's CPU packing: groups of 32 with a bf16 scale and zero
    # GGUF block types as stored (q4_k: 144 bytes per 256 weights, ...), read packed on the GPU
    **{t.lower(): bits_per_weight(t) for t in GGUF_TYPES},
}
GGUF_PREFIX = "gguf-"  # "gguf-4.89": a file's mix of block types, its mean bits per weight
# What the multiply runs in: fp8/int8 weights with activations of the same kind (W8A8); 4-bit
# weights are unpacked and multiplied in bf16 (W4A16).
COMPUTE_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "int8": "int8",
                 "int4": "bf16", "int4-g32": "bf16", **{t.lower(): "bf16" for t in GGUF_TYPES}}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
OP_NAMES = ("embedding", "qkv_proj", "attention", "o_proj", "mlp", "lm_head")
# a hybrid's mixer layers add these two, before the MLP (analysis/mamba.py)
MIXER_OPS = ("mixer_proj", "mixer")


def weight_bytes_per_param(fmt: str) -> float:
    if fmt.startswith(GGUF_PREFIX):
        try:
            return float(fmt.removeprefix(GGUF_PREFIX)) / 8
        except ValueError:
            pass
    if fmt not in WEIGHT_BITS:
        raise InvalidParameter("dtype", f"got {fmt!r}, must be one of {', '.join(WEIGHT_BITS)}")
    return WEIGHT_BITS[fmt] / 8


@dataclass
class Op:
    """One operator over a whole step (all layers): work and traffic."""
    name: str
    flops: float
    bytes_read: float
    bytes_written: float
    compute_dtype: str = "bf16"

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class Precision:
    """Storage formats of a run: layer weights, the embedding/LM-head table, K/V, activations."""
    weights: str = "bf16"
    head: str = "bf16"
    kv: str = "bf16"
    activations: str = "bf16"
    # The LM head's matmul where it reads other bytes than the table the embedding looks up
    # (the CPU int4 path's int8 copy of a tied head); None: the table's.
    lm_head: str | None = None

    @classmethod
    def for_dtype(cls, dtype: str, kv: str | None = None) -> Precision:
        """The usual recipe for a weight format: quantized layers keep a 16-bit head and
        activations; fp8 runs also keep K/V in fp8; fp32 is fp32 throughout."""
        weight_bytes_per_param(dtype)
        wide = "fp32" if dtype == "fp32" else ("fp16" if dtype == "fp16" else "bf16")
        kv = kv or ("fp8" if dtype == "fp8" else wide)
        return cls(weights=dtype, head=wide, kv=kv, activations=wide)


def compute_dtype(fmt: str) -> str:
    """What a weight format multiplies in (GGUF blocks: unpacked to bf16)."""
    return "bf16" if fmt.startswith(GGUF_PREFIX) else COMPUTE_DTYPE[fmt]


def matmul(name: str, rows: int, k: int, n: int, weight_bytes: float, act_bytes: int,
           compute_dtype: str = "bf16") -> Op:
    """[rows, k] @ [k, n]: reads the weight and the input, writes the output."""
    return Op(name, 2.0 * rows * k * n, k * n * weight_bytes + rows * k * act_bytes,
              rows * n * act_bytes, compute_dtype)


def embedding_gather(tokens: int, hidden: int, table_bytes: float, act_bytes: int) -> Op:
    """Look up `tokens` rows of a [vocab, hidden] table: no arithmetic, one row read per token."""
    return Op("embedding", 0.0, tokens * hidden * table_bytes, tokens * hidden * act_bytes)


def attention(c: ModelConfig, seqs: list[tuple[int, int]], kv_bytes: float, act_bytes: int,
              compute_dtype: str = "bf16") -> Op:
    """Causal attention of every layer for (new_tokens, context) pairs: QK^T and PV over each new
    token's keys; each sequence's K/V read once (a sliding layer's: the keys its window reaches),
    the new K/V written once."""
    flops = read = written = 0.0
    nh, nkv, d = c.num_heads, c.num_kv_heads, c.head_dim
    # Layers of one window, and sequences of one shape, cost the same: count each once.
    for window, layers in Counter(mamba.attention_windows(c)).items():
        for (n, ctx), times in Counter(seqs).items():
            k = layers * times
            flops += k * 4.0 * nh * d * keys_seen(ctx - n, n, window)
            reach = ctx if not window else min(ctx, window + n - 1)
            read += k * (2 * reach * nkv * d * kv_bytes + n * nh * d * act_bytes)
            written += k * (2 * n * nkv * d * kv_bytes + n * nh * d * act_bytes)
    return Op("attention", flops, read, written, compute_dtype)


def keys_seen(start: int, n: int, window: int = 0) -> float:
    """Keys the tokens at positions start .. start + n - 1 attend to, summed: position p sees
    p + 1 keys, at most `window` of them in a sliding layer."""
    full = n * start + n * (n + 1) / 2
    if not window:
        return full
    lo = max(window, start)  # positions from lo on see `window` keys, p + 1 - window fewer
    count = max(start + n - lo, 0)
    return full - count * ((lo + 1 - window) + (start + n - window)) / 2


def step_ops(c: ModelConfig, seqs: list[tuple[int, int]], sampled: int,
             precision: Precision = Precision()) -> list[Op]:
    """The operators of one step over (new_tokens, context) pairs; `sampled` rows reach the LM head."""
    for n, ctx in seqs:
        if n < 1 or ctx < n:
            raise InvalidParameter("seqs", f"(new_tokens={n}, context={ctx}): need 1 <= new <= context")
    t = sum(n for n, _ in seqs)
    h, layers = c.hidden_size, c.num_layers
    wb, hb = weight_bytes_per_param(precision.weights), weight_bytes_per_param(precision.head)
    ab = DTYPE_BYTES[precision.activations]
    kvb = weight_bytes_per_param(precision.kv)
    cd = compute_dtype(precision.weights)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qkv = matmul("qkv_proj", t, h, q + 2 * kv, wb, ab, cd)
    o = matmul("o_proj", t, q, h, wb, ab, cd)
    # every layer's MLP; a MoE layer's reads only the experts its tokens chose (analysis/moe.py)
    flops, params, act_in, act_out = mlp_step(c, t)
    mlp = Op("mlp", flops, params * wb + act_in * ab, act_out * ab, cd)
    attending = c.num_attention_layers
    layer_ops = [_times(op, attending) for op in (qkv, o)] + [mlp]
    head_fmt = precision.lm_head or precision.head
    head = matmul("lm_head", sampled, h, c.vocab_size, weight_bytes_per_param(head_fmt), ab,
                  compute_dtype(head_fmt))
    mixers = _mixer_ops(c, seqs, t, wb, ab, cd, kvb) if c.mamba else []
    return [embedding_gather(t, h, hb, ab), layer_ops[0],
            attention(c, seqs, kvb, ab, "fp32" if ab == 4 else "bf16"),
            layer_ops[1], *mixers, layer_ops[2], head]


def _mixer_ops(c: ModelConfig, seqs: list[tuple[int, int]], t: int, wb: float, ab: int,
               cd: str, state_bytes: float) -> list[Op]:
    """A hybrid's mixer layers: in_proj and out_proj as one operator, the conv + scan + norm
    (its state kept in the K/V format) as the other."""
    n_in, n_out = mamba.projection_sizes(c)
    layers = mamba.mixer_layers(c)
    proj = matmul("mixer_proj", t, c.hidden_size, n_in, wb, ab, cd)
    out = matmul("mixer_proj", t, n_out, c.hidden_size, wb, ab, cd)
    both = Op("mixer_proj", (proj.flops + out.flops) * layers,
              (proj.bytes_read + out.bytes_read) * layers,
              (proj.bytes_written + out.bytes_written) * layers, cd)
    flops, read, written = mamba.scan_step(c, seqs, state_bytes, ab)
    return [both, Op("mixer", flops, read, written, "fp32")]


def _times(op: Op, k: int) -> Op:
    return Op(op.name, op.flops * k, op.bytes_read * k, op.bytes_written * k, op.compute_dtype)


def prefill_ops(c: ModelConfig, batch: int, prompt: int, precision: Precision = Precision()) -> list[Op]:
    """`batch` prompts of `prompt` tokens each, prefilled in one step."""
    return step_ops(c, [(prompt, prompt)] * batch, batch, precision)


def decode_ops(c: ModelConfig, batch: int, context: int, precision: Precision = Precision()) -> list[Op]:
    """One decode step of `batch` sequences whose new token sits at position context - 1."""
    return step_ops(c, [(1, context)] * batch, batch, precision)


def num_params(c: ModelConfig) -> dict[str, int]:
    """Parameter counts: the linear layers (every expert), and the embedding/LM-head tables."""
    tables = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return {"layers": _attention_params(c) + mamba.mixer_params(c) + mlp_params(c)[0],
            "tables": tables}


def active_params(c: ModelConfig) -> int:
    """The parameters one token passes through (fewer than all for a mixture of experts)."""
    return _attention_params(c) + mamba.mixer_params(c) + mlp_params(c)[1] + \
        num_params(c)["tables"]


def _attention_params(c: ModelConfig) -> int:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return (c.hidden_size * (q + 2 * kv) + q * c.hidden_size) * c.num_attention_layers


def weight_bytes(c: ModelConfig, precision: Precision = Precision()) -> float:
    """Bytes of all weights as stored."""
    p = num_params(c)
    return p["layers"] * weight_bytes_per_param(precision.weights) + \
        p["tables"] * weight_bytes_per_param(precision.head)
