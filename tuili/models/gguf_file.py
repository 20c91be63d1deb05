"""GGUF files: metadata -> ModelConfig, vocabulary -> Tokenizer, tensors -> HF-named torch tensors.

The `gguf` package parses the file and dequantizes blocks; this module maps llama.cpp's names and
conventions onto HF's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tuili.errors import ModelLoadError
from tuili.layers.int4 import Int4Weight
from tuili.models import chat_templates
from tuili.models.config import ModelConfig
from tuili.models.tokenizer import Tokenizer
from tuili.quantization.gguf import TYPES as GGUF_TYPES
from tuili.quantization.gguf import GgufTensor

SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)

# GGUF architecture -> HF class name
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM"}
# Families whose config is parsed by their own class from the metadata as an HF config.json.
OWN_CONFIG = ("gemma3",)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Gemma 3 norms both sides of attention and the MLP: llama.cpp's ffn_norm is the one before it.
_GEMMA3_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}

# Pre-tokenizer split patterns by llama.cpp's tokenizer.ggml.pre name.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF file, reusing an earlier parse of the same unchanged file in this process."""
    st = Path(path).stat()
    return _open_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFModel:
    return GGUFModel(path)


class GGUFModel:
    """An opened GGUF file. Reading is lazy: tensors are dequantized as they are iterated."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self._check_complete()
        self.arch = self._get("general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def _check_complete(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            end = t.data_offset + t.n_bytes
            if end > size:
                raise ModelLoadError(f"{self.path}: truncated: tensor {t.name!r} ends at byte {end} "
                                     f"but the file has {size} bytes; download it again")

    def _get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def config(self) -> ModelConfig:
        a = self.arch
        if a not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: architecture {a!r} is not supported; supported GGUF "
                f"architectures: {', '.join(ARCHITECTURES)}")
        get = lambda k, d=None: self._get(f"{a}.{k}", d)  # noqa: E731
        if a in OWN_CONFIG:
            from tuili.models.registry import config_from_hf

            return config_from_hf(self._hf_config(get))
        heads = get("attention.head_count")
        hidden = get("embedding_length")
        tokens = self._get("tokenizer.ggml.tokens") or []
        eos = self._get("tokenizer.ggml.eos_token_id")
        scaling = None
        if "rope_freqs.weight" in self.tensors:
            scaling = {"rope_type": "factors", "factors": self._tensor("rope_freqs.weight")}
        elif get("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
        return ModelConfig(
            architecture=ARCHITECTURES[a],
            vocab_size=get("vocab_size") or len(tokens),
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv") or heads,
            head_dim=get("attention.key_length") or hidden // heads,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=get("rope.freq_base", 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
            bos_token_id=self._get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[eos] if eos is not None else [],
        )

    def _hf_config(self, get) -> dict:
        """The metadata as the HF config.json keys it holds (as transformers' GGUF loader reads
        them); what it lacks takes the family's HF defaults."""
        cfg = {"architectures": [ARCHITECTURES[self.arch]],
               "vocab_size": get("vocab_size") or len(self._get("tokenizer.ggml.tokens") or []),
               "hidden_size": get("embedding_length"), "intermediate_size": get("feed_forward_length"),
               "num_hidden_layers": get("block_count"),
               "num_attention_heads": get("attention.head_count"),
               "num_key_value_heads": get("attention.head_count_kv"),
               "head_dim": get("attention.key_length"),
               "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
               "rope_theta": get("rope.freq_base"), "max_position_embeddings": get("context_length"),
               "sliding_window": get("attention.sliding_window"),
               "tie_word_embeddings": "output.weight" not in self.tensors,
               "bos_token_id": self._get("tokenizer.ggml.bos_token_id"),
               "eos_token_id": self._get("tokenizer.ggml.eos_token_id")}
        return {k: v for k, v in cfg.items() if v is not None}

    def _check_type(self, name: str, t) -> None:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which tuili cannot "
                f"read; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}")

    def _tensor(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        self._check_type(name, t)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        return _as_float(np.asarray(t.data), t.tensor_type).reshape(shape)

    def has_int4_weights(self) -> bool:
        return any(t.tensor_type in INT4_TYPES for t in self.reader.tensors)

    def head_is_quantized(self) -> bool:
        """Whether the file stores its LM head (output.weight, else the token_embd table it is
        tied to) in blocks of fewer than 16 bits (SmolLM2-135M's Q4_1 file: a Q8_0 token_embd)."""
        t = self.tensors.get("output.weight", self.tensors.get("token_embd.weight"))
        return t is not None and t.tensor_type not in (Q.F32, Q.F16, Q.BF16)

    def packed_types(self) -> set[str]:
        """The block types among the layers' weights that GgufMethod keeps packed."""
        return {t.tensor_type.name for n, t in self.tensors.items() if n.startswith("blk.")
                and t.tensor_type.name in GGUF_TYPES and len(t.shape) == 2}

    def weights(self, int4: bool = False, blocks: bool = False, head_blocks: bool = False,
                lazy: bool = False
                ) -> Iterator[tuple[str, torch.Tensor | Int4Weight | GgufTensor | GgufSlice]]:
        """HF-named tensors, q/k rows put back in HF's rotate-half order. Float32, except that
        with int4=True the 4-bit linear weights stay packed as Int4Weight, and with blocks=True
        the layers' weights of the types GgufMethod reads stay the file's blocks (GgufTensor;
        the LM head too with head_blocks=True). lazy: 2-D tensors come as GgufSlice, of which a
        tensor-parallel rank reads (dequantizes, unpacks) only its part."""
        c = self.config()
        layer_names = _GEMMA3_NAMES if self.arch == "gemma3" else _LAYER_NAMES
        for name in self.tensors:
            hf_name = _hf_name(name, layer_names)
            if hf_name is None:
                continue
            t = self.tensors[name]
            rope = self.arch in ("llama", "mistral") and name.endswith(
                ("attn_q.weight", "attn_k.weight"))
            heads = c.num_heads if ".attn_q." in name else c.num_kv_heads
            linear = (name.startswith("blk.") or (head_blocks and name == "output.weight")) \
                and len(t.shape) == 2
            if lazy and len(t.shape) == 2:
                self._check_type(name, t)
                form = "int4" if int4 and t.tensor_type in INT4_TYPES and name.startswith("blk.") \
                    else "blocks" if blocks and linear and t.tensor_type.name in GGUF_TYPES \
                    else "float"
                yield hf_name, GgufSlice(t, form, heads if rope else None)
                continue
            if int4 and t.tensor_type in INT4_TYPES and name.startswith("blk."):
                tensor = unpack_q4(np.asarray(t.data), t.tensor_type)
            elif blocks and linear and t.tensor_type.name in GGUF_TYPES:
                data = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(int(t.shape[1]), -1))
                tensor = GgufTensor(t.tensor_type.name, data, int(t.shape[0]))
            else:
                tensor = self._tensor(name)
            # llama.cpp's converter interleaves q/k rows for its rope; llama-arch files only.
            if rope:
                if isinstance(tensor, (Int4Weight, GgufTensor)):
                    tensor = tensor.permute_rows(lambda x: unpermute_rope_rows(x, heads))
                else:
                    tensor = unpermute_rope_rows(tensor, heads)
            # llama.cpp's converter stores Gemma's norm weights with their 1 added.
            if self.arch == "gemma3" and name.endswith("norm.weight"):
                tensor = tensor - 1
            yield hf_name, tensor

    def tokenizer(self) -> Tokenizer:
        kind = self._get("tokenizer.ggml.model")
        tokens = self._get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{self.path}: no tokenizer in the file")
        types = self._get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, self._get("tokenizer.ggml.merges") or [],
                                      self._get("tokenizer.ggml.pre", "default"))
            default_bos = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, self._get("tokenizer.ggml.scores"), types,
                                         self._get("tokenizer.ggml.add_space_prefix", True))
            default_bos = True
        else:
            raise ModelLoadError(f"{self.path}: tokenizer model {kind!r} is not supported "
                                 "(supported: gpt2-style BPE, llama/SentencePiece)")
        # Control (3) tokens are special; user-defined (4) ones are matched whole but kept in text.
        backend.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                            for i in range(len(tokens)) if types[i] in (3, 4)])
        bos_id = self._get("tokenizer.ggml.bos_token_id")
        eos_id = self._get("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        if self._get("tokenizer.ggml.add_bos_token", default_bos) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        template = self._get("tokenizer.chat_template") or chat_templates.FOR_GGUF.get(self.arch)
        return Tokenizer(backend, bos_token=bos, eos_token=tokens[eos_id] if eos_id is not None else None,
                         chat_template=template)


def _as_float(data: np.ndarray, qtype: Q) -> torch.Tensor:
    """A GGUF array (rows of blocks, or of floats) as float32 values."""
    array = data.astype(np.float32) if qtype in (Q.F32, Q.F16) else dequantize(data, qtype)
    return torch.from_numpy(np.ascontiguousarray(array))


class GgufSlice:
    """A 2-D GGUF tensor not read yet, with torch's `shape` and `narrow`: a tensor-parallel rank
    reads its rows alone, and its columns alone where they start and end on block boundaries
    (else whole rows, cut once decoded). form: what comes out, "float" (dequantized), "int4"
    (4-bit blocks unpacked as Int4Weight) or "blocks" (the file's bytes as GgufTensor; a column
    cut off the block boundaries dequantizes). rope_heads: q/k rows (the rank's whole heads)
    put back in HF's order."""

    def __init__(self, tensor, form: str = "float", rope_heads: int | None = None):
        self._t, self._form, self._rope_heads = tensor, form, rope_heads
        self.shape = torch.Size(int(d) for d in reversed(tensor.shape))
        self.block, self.block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor | Int4Weight:
        rows, cols = (start, length), (0, self.shape[1])
        if dim == 1:
            rows, cols = (0, self.shape[0]), (start, length)
        if self._rope_heads is not None and dim == 0:
            per_head = self.shape[0] // self._rope_heads
            if start % per_head or length % per_head:
                raise ValueError(f"rows {start}..{start + length} of a q/k weight are not whole "
                                 f"heads of {per_head} rows")
        return self._read(rows, cols)

    def materialize(self) -> torch.Tensor | Int4Weight:
        return self._read((0, self.shape[0]), (0, self.shape[1]))

    def _read(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor | Int4Weight:
        qtype = self._t.tensor_type
        data = np.asarray(self._t.data)[rows[0]:rows[0] + rows[1]]
        # Int4Weight groups are 32 columns: a K-quant's 256-wide blocks unpack whole, then cut.
        step = self.block
        if cols[0] % step or cols[1] % step:
            cut, whole = cols, True
        else:
            first, n = cols[0] // step, cols[1] // step
            width = self.block_bytes if qtype not in (Q.F32, Q.F16) else 1
            data = data[:, first * width:(first + n) * width]
            cut, whole = (0, cols[1]), False
        if self._form == "int4" and not (whole and (cut[0] % 32 or cut[1] % 32)):
            w = unpack_q4(data, qtype)
            w = w if not whole else w.narrow(1, *cut)
        elif self._form == "blocks" and not whole:
            w = GgufTensor(qtype.name, torch.from_numpy(np.array(data, dtype=np.uint8)), cols[1])
        else:
            w = _as_float(data, qtype)
            w = w if not whole else w.narrow(1, *cut)
        if self._rope_heads is not None:
            heads = self._rope_heads * rows[1] // self.shape[0]
            fn = lambda x: unpermute_rope_rows(x, heads)  # noqa: E731
            w = w.permute_rows(fn) if isinstance(w, (Int4Weight, GgufTensor)) else fn(w)
        return w


def unpack_q4(data: np.ndarray, qtype: Q) -> Int4Weight:
    """GGUF 4-bit blocks ([rows, bytes]) -> q, scale, zero per 32 values: w = (q - 8)*scale + zero."""
    rows = data.shape[0]
    f16 = lambda b: b.copy().view(np.float16).astype(np.float32)  # noqa: E731
    if qtype in (Q.Q4_0, Q.Q4_1):
        blocks = data.reshape(rows, -1, 18 if qtype == Q.Q4_0 else 20)
        d = f16(blocks[..., 0:2])
        qs = blocks[..., 2:18] if qtype == Q.Q4_0 else blocks[..., 4:20]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # low nibbles hold values 0-15
        zero = np.zeros_like(d) if qtype == Q.Q4_0 else f16(blocks[..., 2:4]) + 8 * d
        scale = d
    elif qtype == Q.Q4_K:
        blocks = data.reshape(rows, -1, 144)
        d, dmin = f16(blocks[..., 0:2])[..., None], f16(blocks[..., 2:4])[..., None]
        sc, mn = _q4k_scales(blocks[..., 4:16].astype(np.int32))
        qs = blocks[..., 16:144].reshape(rows, -1, 4, 32)
        # Each 32-byte chunk holds two sub-blocks: low nibbles, then high nibbles.
        q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(rows, -1, 8, 32)
        scale = d * sc
        zero = 8 * scale - dmin * mn
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit block type")
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))  # noqa: E731
    return Int4Weight(to(q.astype(np.int32)), to(scale.astype(np.float32)), to(zero.astype(np.float32)))


def _q4k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [..., 8, 1]."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc[..., None].astype(np.float32), mn[..., None].astype(np.float32)


def unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (0, d/2, 1, d/2+1, ...) -> (0, 1, ..., d-1)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str, layer_names: dict[str, str] = _LAYER_NAMES) -> str | None:
    base, _, kind = name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    if parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
    return None  # rope_freqs and the like are read into the config instead


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    llama3 = pre in ("llama3", "llama-bpe", "llama-v3")
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=llama3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if llama3 or pre in ("qwen2", "deepseek-r1-qwen"):
        pattern = _LLAMA3_PATTERN if llama3 else _QWEN2_PATTERN
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        gpt2 = pre_tokenizers.Split(Regex(_GPT2_PATTERN), behavior="isolated")
        steps = [gpt2, byte_level]
        if pre == "smollm":  # digits one at a time, then GPT-2's split
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], scores, types: list[int], add_space_prefix: bool) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = scores if scores is not None else [0.0] * len(tokens)
    # SentencePiece BPE keeps no merge list: rebuild it, ranking each merge by the merged piece's score.
    merges = []
    for piece, piece_id in vocab.items():
        if types[piece_id] != 1:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((scores[piece_id], piece_id, left, right))
    merges.sort(key=lambda m: (-m[0], m[1]))
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    tok = HFTokenizer(models.BPE(vocab, [(m[2], m[3]) for m in merges], unk_token=unk,
                                 byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    return tok
