"""EAGLE draft heads: a decoder layer that guesses the target's next token from the target's own
hidden states, in the public checkpoint layouts.

- EAGLE-1/2 (yuhuili/EAGLE-*): `fc` [hidden, 2 * hidden] over concat(embedding of the token, the
  target's last hidden state after its final norm), then Llama decoder layers `layers.i.*` (the
  first one's input norm skipped, as the original does), and the target's LM head on the output
  (no norm). The embedding is the checkpoint's own when it has one, else the target's.
- EAGLE-3 (yuhuili/EAGLE3-*): `fc` [hidden, 3 * hidden] fuses the target's residual streams at
  three layers (low, middle, high); `midlayer.*` is a decoder layer whose attention reads
  concat(input_layernorm(embedding), hidden_norm(fused)) (q/k/v take 2 * hidden), its residual
  the fused state; `norm`, then `lm_head` over a draft vocabulary whose token i is target token
  i + d2t[i].

Entry p of a head's sequence reads token p + 1 and the hidden state at position p, and predicts
token p + 2; the state it puts out stands in for the target's at p + 1 for the next guess.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tuili.errors import ModelLoadError
from tuili.layers.attention import Attention, AttentionMetadata
from tuili.layers.hidden_tap import HiddenTap
from tuili.layers.linear import Linear, default_weight_loader
from tuili.layers.norm import RMSNorm
from tuili.layers.parallel import ColumnParallelLinear, VocabParallelEmbedding
from tuili.layers.residual import SplitStream
from tuili.models.config import ModelConfig
from tuili.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


def eagle3_tap_layers(num_layers: int) -> list[int]:
    """The target layers whose input streams an EAGLE-3 head fuses (vLLM's choice)."""
    return [2, num_layers // 2, num_layers - 3]


class _NoNorm:
    """The first EAGLE-1 layer's input norm: none (the fused state enters as it is)."""

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return x if residual is None else (x + residual, x + residual)


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor by name) of a head folder: *.safetensors or pytorch_model.bin."""
    if not folder.is_dir():
        raise ModelLoadError(f"EAGLE head {folder}: not a folder (an EAGLE head checkpoint is a "
                             "folder with config.json and its weights)")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"EAGLE head {folder}: no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"EAGLE head {cfg_path}: not JSON ({e})") from e
    weights: dict[str, torch.Tensor] = {}
    shards = sorted(folder.glob("*.safetensors"))
    try:
        if shards:
            from safetensors.torch import load_file

            for shard in shards:
                weights.update(load_file(shard))
        else:
            bins = sorted(folder.glob("pytorch_model*.bin"))
            if not bins:
                raise ModelLoadError(f"EAGLE head {folder}: no *.safetensors or pytorch_model.bin")
            for shard in bins:
                weights.update(torch.load(shard, map_location="cpu", weights_only=True))
    except ModelLoadError:
        raise
    except Exception as e:  # a truncated or foreign file: say which
        raise ModelLoadError(f"EAGLE head {folder}: unreadable weights ({type(e).__name__}: {e})") from e
    return cfg, {k.removeprefix("model."): v for k, v in weights.items()}


class EagleHead(nn.Module):
    """The head over a target LlamaForCausalLM (whose embedding and, for EAGLE-1, LM head it
    shares). Before each forward `stage` takes one hidden state [tokens, hidden] per input row
    (the target's, fused for EAGLE-3, or the head's own last output); after it, `tap.hidden`
    holds the output states of the rows it sampled (the next draft step's input states), as a
    target's tap does, so that CUDA graph replays hand them out too."""

    MERGED = LlamaForCausalLM.MERGED
    checkpoint_target = LlamaForCausalLM.checkpoint_target

    def __init__(self, c: ModelConfig, target: LlamaForCausalLM, eagle3: bool,
                 fc_bias: bool, own_embedding: bool, draft_vocab: int):
        super().__init__()
        self.config, self.backend, self.eagle3 = c, target.backend, eagle3
        self._target = (target,)  # shared, not a submodule: its weights are the target's
        d = c.hidden_size
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, d) if own_embedding else None
        self.fc = Linear(d * (3 if eagle3 else 2), d, bias=fc_bias)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, self.backend)
                                    for _ in range(1 if eagle3 else c.num_layers))
        if not eagle3:
            self.layers[0].input_layernorm = None  # the original skips it (see _NoNorm)
        else:
            attn = self.layers[0].self_attn
            attn.qkv_proj = ColumnParallelLinear(2 * d, list(attn.qkv_proj.out_sizes),
                                                 bias=c.attention_bias)
            self.layers[0].hidden_norm = RMSNorm(d, c.rms_norm_eps, self.backend)
            self.norm = RMSNorm(d, c.rms_norm_eps, self.backend)
            self.lm_head = Linear(d, draft_vocab)
            self.register_buffer("draft_to_target", torch.arange(draft_vocab))
        # The staged input states: rows of `hidden_buf` (which the CUDA graphs read), or, for a
        # step of more rows than it holds (a long catch-up, always eager), hidden_in.
        self.hidden_buf = torch.zeros(0, d)
        self.hidden_in: torch.Tensor | None = None
        self.tap = HiddenTap(())

    @property
    def target(self) -> LlamaForCausalLM:
        return self._target[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.embed_tokens or self.target.embed_tokens)(ids)

    def reserve(self, rows: int) -> None:
        """Room for `rows` staged input rows, before any CUDA graph is captured (they read it)."""
        self.hidden_buf = self.fc.weight.new_zeros(rows, self.config.hidden_size)

    def stage(self, states: torch.Tensor) -> None:
        """The input states of the next forward's rows."""
        n = len(states)
        if n <= len(self.hidden_buf):
            self.hidden_buf[:n].copy_(states)
            self.hidden_in = None
        else:
            self.hidden_in = states.to(self.fc.weight.dtype)

    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        """EAGLE-3: the target's three tapped streams [n, 3 * hidden] -> the head's input state."""
        return self.backend.linear(taps, self.fc)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_in if self.hidden_in is not None else self.hidden_buf[:len(input_ids)]
        emb = self.embed(input_ids)
        if self.eagle3:
            out = self._midlayer(emb, h, meta)
        else:
            stream = SplitStream(self.backend, self.backend.linear(torch.cat([emb, h], -1),
                                                                   self.fc))
            for i, layer in enumerate(self.layers):
                norm = layer.input_layernorm if i else _NoNorm()
                stream = layer.self_attn(stream, norm, meta)
                stream = layer.mlp(stream, layer.post_attention_layernorm)
            out = stream.hidden()
        out = out if rows is None else out.index_select(0, rows)
        self.tap.hidden = out
        return out

    def _midlayer(self, emb: torch.Tensor, h: torch.Tensor, meta: AttentionMetadata):
        layer = self.layers[0]
        attn: LlamaAttention = layer.self_attn
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(h)], -1)
        qkv = self.backend.linear(x, attn.qkv_proj)
        qkv = qkv.view(qkv.shape[0], attn.nh + 2 * attn.nkv, attn.d)
        out = attn.attn(qkv, meta, attn.q_norm, attn.k_norm)
        stream = SplitStream(self.backend, self.backend.linear(out, attn.o_proj), h)
        return layer.mlp(stream, layer.post_attention_layernorm).hidden()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary (EAGLE-3: -inf outside the draft vocabulary)."""
        if not self.eagle3:
            head = self.target.lm_head
            return head.gather(self.backend.linear(hidden, head))
        draft = self.backend.linear(self.norm(hidden), self.lm_head)
        full = draft.new_full((draft.shape[0], self.target.config.vocab_size), float("-inf"))
        full[:, self.draft_to_target] = draft
        return full

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def load(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Fill every parameter from HF-named tensors (EAGLE-3's midlayer.* as layers.0.*)."""
        params = dict(self.named_parameters())
        expected = {f"{n}#{p}" for n, prm in params.items()
                    for p in range(getattr(prm, "num_parts", 1))}
        loaded = set()
        for name, tensor in weights.items():
            if name in ("d2t", "t2d"):
                continue
            name = name.replace("midlayer.", "layers.0.")
            if not self.eagle3 and name == "layers.0.input_layernorm.weight":
                continue  # the first layer reads the fused state unnormed (see _NoNorm)
            target, part = self.checkpoint_target(name)
            if target not in params:
                raise ModelLoadError(f"EAGLE head {source}: tensor {name!r} has no place in an "
                                     f"{'EAGLE-3' if self.eagle3 else 'EAGLE'} head")
            param = params[target]
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, part)
            except ValueError as e:
                raise ModelLoadError(f"EAGLE head {source}: {name}: {e}") from None
            loaded.add(f"{target}#{part}")
        missing = sorted({m.split("#")[0] for m in expected - loaded})
        if missing:
            raise ModelLoadError(f"EAGLE head {source}: the checkpoint lacks " + ", ".join(missing[:8]))


def load_head(path: str, method: str, target: LlamaForCausalLM, dtype: torch.dtype,
              device: torch.device) -> EagleHead:
    """The head at `path` for `target`, checked against it: method eagle takes either layout
    (told apart by fc's width), eagle3 only EAGLE-3's."""
    folder = Path(path)
    cfg, weights = read_checkpoint(folder)
    tc = target.config
    d = tc.hidden_size
    if cfg.get("hidden_size") != d:
        raise ModelLoadError(f"EAGLE head {path}: hidden_size {cfg.get('hidden_size')}, the "
                             f"target's is {d}; a head is trained for one target")
    fc = weights.get("fc.weight")
    if fc is None:
        raise ModelLoadError(f"EAGLE head {path}: no fc.weight (the projection of the target's "
                             "hidden states every EAGLE head starts with); is this a head?")
    if fc.shape not in ((d, 2 * d), (d, 3 * d)):
        raise ModelLoadError(f"EAGLE head {path}: fc.weight is {list(fc.shape)}, must be "
                             f"[{d}, {2 * d}] (EAGLE) or [{d}, {3 * d}] (EAGLE-3)")
    eagle3 = fc.shape[1] == 3 * d
    if method == "eagle3" and not eagle3:
        raise ModelLoadError(f"EAGLE head {path}: an EAGLE-1/2 head (fc over 2 x hidden); use "
                             "method eagle")
    try:
        c = ModelConfig.from_hf({**cfg, "vocab_size": tc.vocab_size},
                                attention_bias=cfg.get("attention_bias", False))
    except KeyError as e:
        raise ModelLoadError(f"EAGLE head {path}: config.json lacks {e.args[0]!r}") from None
    own_embedding = "embed_tokens.weight" in weights
    if own_embedding and weights["embed_tokens.weight"].shape[0] != tc.vocab_size:
        raise ModelLoadError(f"EAGLE head {path}: its embedding has "
                             f"{weights['embed_tokens.weight'].shape[0]} tokens, the target "
                             f"{tc.vocab_size}; a head must share the target's tokenizer")
    draft_vocab, d2t = tc.vocab_size, None
    if eagle3:
        if "lm_head.weight" not in weights:
            raise ModelLoadError(f"EAGLE head {path}: an EAGLE-3 head needs its lm_head.weight")
        draft_vocab = weights["lm_head.weight"].shape[0]
        d2t = weights.get("d2t")
        if d2t is None and draft_vocab != tc.vocab_size:
            raise ModelLoadError(f"EAGLE head {path}: a draft vocabulary of {draft_vocab} tokens "
                                 "needs d2t (draft id -> target id offsets)")
        if d2t is not None:
            if d2t.shape != (draft_vocab,):
                raise ModelLoadError(f"EAGLE head {path}: d2t is {list(d2t.shape)}, must be "
                                     f"[{draft_vocab}] like lm_head.weight's rows")
            ids = torch.arange(draft_vocab) + d2t.long()
            if ids.min() < 0 or ids.max() >= tc.vocab_size:
                raise ModelLoadError(f"EAGLE head {path}: d2t maps draft tokens outside the "
                                     f"target's vocabulary [0, {tc.vocab_size})")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)
    try:
        head = EagleHead(c, target, eagle3, "fc.bias" in weights, own_embedding, draft_vocab)
    finally:
        torch.set_default_dtype(default)
    head.load(weights, path)
    if d2t is not None:
        head.draft_to_target.copy_(torch.arange(draft_vocab) + d2t.long())
    for module in head.modules():
        if isinstance(module, Linear):
            module.process_weights_after_loading()
    return head.to(dtype=dtype, device=device).eval()
