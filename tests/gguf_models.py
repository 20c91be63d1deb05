"""Random GGUF blocks of each type, and random-weight llama-architecture GGUF files built from
them (written by the gguf package's own writer), for the GGUF block tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize
from tokenizers import pre_tokenizers

from tuili.kernels.reference_gguf import LAYOUTS

# d (and min) magnitudes that keep a random block's weights around 0.01-0.05
SCALES = {"Q8_0": 3e-4, "Q4_0": 4e-3, "Q4_1": 4e-3, "Q4_K": 6e-5, "Q5_K": 3e-5, "Q6_K": 1e-5}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, bytes per row]: random quants and sub-block scales, float16 d of SCALES'
    size and a min that centres the weights."""
    values, nbytes, fields = LAYOUTS[qtype]
    b = np.frombuffer(rng.bytes(rows * cols // values * nbytes), dtype=np.uint8)
    b = b.reshape(rows, cols // values, nbytes).copy()
    d = rng.uniform(0.5, 1.5, (rows, cols // values, 1)).astype(np.float32) * SCALES[qtype]
    lo, hi = fields["d"]
    b[..., lo:hi] = d.astype(np.float16).view(np.uint8)
    if "m" in fields:  # the min that centres the weights on average (mean q times the scale)
        lo, hi = fields["m"]
        m = {"Q4_1": -8 * d, "Q4_K": 7.5 * d, "Q5_K": 15.5 * d}[qtype]
        b[..., lo:hi] = m.astype(np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def tensor_data(qtype: str, rows: int, cols: int, rng: np.random.Generator):
    """(data, raw type or None) for GGUFWriter.add_tensor: random blocks for the kernels' types,
    random float weights quantized by gguf for the others (F32 and F16 kept as they are)."""
    if qtype in LAYOUTS:
        return random_blocks(qtype, rows, cols, rng), Q[qtype]
    w = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.03)
    if qtype in ("F32", "F16"):
        return w.astype(np.float16 if qtype == "F16" else np.float32), None
    return quantize(w, Q[qtype]), Q[qtype]


def write_llama_gguf(path: Path, hidden: int, intermediate: int, layers: int, heads: int,
                     kv_heads: int, types: dict[str, str], seed: int = 0,
                     head_type: str = "F32", vocab: int = 256, embed_type: str = "F32") -> Path:
    """A random llama GGUF whose vocabulary opens with the 256 byte tokens (then "<tN>" ones up
    to `vocab`); `types` maps llama.cpp's tensor
    names (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down) to block types,
    a key "L.name" overriding layer L's."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    w.add_token_list(tokens + [f"<t{i}>" for i in range(len(tokens), vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    head_dim = hidden // heads
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
              "ffn_down": (hidden, intermediate)}

    def add(name: str, qtype: str, rows: int, cols: int) -> None:
        data, raw = tensor_data(qtype, rows, cols, rng)
        w.add_tensor(name, data, raw_dtype=raw) if raw is not None else w.add_tensor(name, data)

    add("token_embd.weight", embed_type, vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add("output.weight", head_type, vocab, hidden)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight",
                         (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for name, (rows, cols) in shapes.items():
            add(f"blk.{i}.{name}.weight", types.get(f"{i}.{name}", types[name]), rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
