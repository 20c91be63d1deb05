"""Random-weight HF models of real shapes, saved as folders tuili can load (no checkpoint needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# name -> (transformers config class, model class, config); layer counts cut to keep tests quick.
SHAPES = {
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, rope_theta=1000000.0, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
        rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False)),
    # Gemma 3 1B's shape, its window cut to 64 tokens and every other layer global, so short
    # prompts cross the window and a few layers hold both kinds.
    "gemma3-1b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=64,
        sliding_window_pattern=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}


def byte_tokenizer() -> Tokenizer:
    """A byte-level vocabulary of 256 tokens: enough to run text in and out of a random model."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def word_tokenizer(vocab: int) -> Tokenizer:
    """One word ("t17") per id of a `vocab`-sized model, so every generated id decodes to text."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def vocabulary_tokenizer(vocab: int, specials: int = 256, seed: int = 0) -> Tokenizer:
    """A byte-level tokenizer of `vocab` tokens built offline, shaped like Llama 3's vocabulary:
    the 256 bytes, numbers of up to three digits, runs of JSON punctuation, words with and
    without a leading space (random letters), and `specials` special tokens at the top (the last
    is <|eot_id|>). It has no merges (text encodes to bytes), but every token decodes, so a
    grammar engine sees a real vocabulary's mix of token strings, and its masks cost what a real
    one's do."""
    import random

    rng = random.Random(seed)
    space, newline = "\u0120", "\u010a"  # ByteLevel's ' ' and '\n'
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    seen = set(tokens)

    def add(text: str) -> None:
        piece = text.replace(" ", space).replace("\n", newline)
        if piece not in seen and len(tokens) < vocab - specials:
            seen.add(piece)
            tokens.append(piece)

    for width in (1, 2, 3):
        for i in range(10 ** width):
            add(f"{i:0{width}d}")
    punct = ['{', '}', '[', ']', '"', ':', ',', ' ', '\n', '.', '-']
    for a in punct:
        for b in punct:
            add(a + b)
            for c in punct:
                add(a + b + c)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(tokens) < vocab - specials:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        add(rng.choice(["", " ", " ", '"', ' "']) + (word.title() if rng.random() < 0.2 else word))
    model = models.BPE({t: i for i, t in enumerate(tokens)}, [])
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [f"<|reserved_special_token_{i}|>" for i in range(specials - 1)] + ["<|eot_id|>"]
    tok.add_special_tokens(names)
    assert tok.get_vocab_size() == vocab
    return tok


def build(name: str, folder: Path, num_layers: int | None = None, dtype=torch.bfloat16,
          branch_scale: float = 1.0, echo: bool = False):
    """Save a random `name`-shaped model to `folder`; return the HF model (on the GPU).
    branch_scale: the layers' output projections (o_proj, down_proj) scaled by it; below 1 each
    layer adds less to the residual stream, so the network is less chaotic (two kernels' bf16
    roundings lead less often to different greedy tokens).
    echo: the embeddings scaled up 100x and the LM head made a copy of them, so that (with a
    small branch_scale) the residual stream is its input token's embedding plus little and each
    position's greedy token is its input token by a wide margin: every kernel path agrees on the
    continuation (the last prompt token repeated). Same shapes and bytes as the plain model."""
    import transformers

    config_cls, model_cls, cfg = SHAPES[name]
    config = getattr(transformers, config_cls)(**cfg, num_hidden_layers=num_layers or 4,
                                               bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, model_cls)(config).to(dtype).eval()
    if branch_scale != 1.0:
        with torch.no_grad():
            for name_, p in model.named_parameters():
                if name_.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(branch_scale)
    if echo:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb.mul_(100.0)
            model.get_output_embeddings().weight.copy_(emb)
    model.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return model


def build_with_vocabulary(name: str, folder: Path, num_layers: int | None = None):
    """build(), then the shape's whole vocabulary as text (vocabulary_tokenizer), <|eot_id|> (its
    last id) the end of sequence: for what needs real token strings, such as grammars."""
    import json

    model = build(name, folder, num_layers)
    vocab = SHAPES[name][2]["vocab_size"]
    vocabulary_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    for file in ("config.json", "generation_config.json"):
        path = folder / file
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1)
            path.write_text(json.dumps(cfg))
    return model


def random_cache(num_blocks: int, block_size: int, kvh: int, d: int, dtype=torch.bfloat16):
    """A random paged K and V cache: [num_blocks, block_size, kv_heads, head_dim] each, on the GPU."""
    return (torch.randn(num_blocks, block_size, kvh, d, device="cuda", dtype=dtype),
            torch.randn(num_blocks, block_size, kvh, d, device="cuda", dtype=dtype))


def random_tables(seq_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    """Block tables giving each sequence its own blocks, in a shuffled order, padded with 0."""
    width = max(-(-n // block_size) for n in seq_lens)
    perm = torch.randperm(num_blocks, device="cuda")
    tables = torch.zeros(len(seq_lens), width, dtype=torch.long, device="cuda")
    used = 0
    for i, n in enumerate(seq_lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    return tables
