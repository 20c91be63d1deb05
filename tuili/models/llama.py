"""The Llama family: Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Checkpoint names follow HF transformers; q/k/v and gate/up load into merged projections.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tuili.layers.attention import Attention, AttentionMetadata
from tuili.layers.embedding import Embedding
from tuili.layers.linear import Linear, fuses_into_gemv, linear
from tuili.layers.norm import RMSNorm
from tuili.models.config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = Linear(c.hidden_size, [self.nh * self.d, self.nkv * self.d, self.nkv * self.d],
                               bias=c.attention_bias)
        self.o_proj = Linear(self.nh * self.d, c.hidden_size)
        self.q_norm = RMSNorm(self.d, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.d, c.rms_norm_eps) if c.qk_norm else None
        self.attn = Attention(self.nh, self.nkv, self.d)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, norm: RMSNorm | None = None,
                norm_sumsq: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, want_sumsq: bool = False):
        """o_proj(attention(qkv_proj(norm(x)))) (+ residual); norm and residual come at decode,
        where they run inside the two projections' GEMVs (see `linear` for the sums of squares).
        Given `rows`, o_proj runs on those rows alone (every token's K/V is stored all the same)."""
        qkv = self.qkv_proj(x, norm=norm, norm_sumsq=norm_sumsq)
        qkv = qkv.view(x.shape[0], self.nh + 2 * self.nkv, self.d)
        q, k, v = self.attn.prepare_qkv(qkv, meta, self.q_norm, self.k_norm)
        out = self.attn(q, k, v, meta)
        if rows is not None:
            out = out.index_select(0, rows)
        return self.o_proj(out, residual=residual, want_sumsq=want_sumsq)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(c.hidden_size, [c.intermediate_size, c.intermediate_size])
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                norm_sumsq: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                want_sumsq: bool = False):
        """down(silu(gate) * up) of norm(x) (+ residual)."""
        gate_up = self.gate_up_proj(x, norm=norm, norm_sumsq=norm_sumsq, gated=True)
        return self.down_proj(gate_up, residual=residual, want_sumsq=want_sumsq)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                rows: torch.Tensor | None = None):
        """(x, residual) -> (x, residual): the hidden stream is x + residual, or x alone when
        residual is None. Given `rows`, only those rows come out (see LlamaForCausalLM)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, meta, rows=rows)
        if rows is not None:
            residual = residual.index_select(0, rows)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def decode(self, x: torch.Tensor, sumsq: torch.Tensor | None, meta: AttentionMetadata,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, sumsq) -> (x, sumsq) for a decode-sized step (`fuses_into_gemv`): x is the whole
        stream; the norms are GEMV prologues scaled by sumsq (x's sums of squares in parts, left by
        the GEMV that wrote x; None: the prologue sums them itself), the residual adds GEMV
        epilogues, which leave the new stream's sums."""
        kept = x if rows is None else x.index_select(0, rows)
        h, h_sumsq = self.self_attn(x, meta, norm=self.input_layernorm, norm_sumsq=sumsq,
                                    residual=kept, rows=rows, want_sumsq=True)
        return self.mlp(h, norm=self.post_attention_layernorm, norm_sumsq=h_sumsq, residual=h,
                        want_sumsq=True)


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our module path, part index of the merged layer)
    MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size)
        # The last decode stream and its sums of squares, for the final norm in `logits`.
        self._final: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden stream [tokens, hidden] after the last layer; `logits` applies the final norm.
        Given `rows`, only those tokens' states [len(rows), hidden]: every layer still stores every
        token's K/V, but the last one runs o_proj and its MLP on those rows alone (for a 32-layer
        prompt that is ~3% of the prefill's matmuls saved)."""
        x, residual = self.embed_tokens(input_ids), None
        last = len(self.layers) - 1
        if fuses_into_gemv(x):
            sumsq = None  # the embedding leaves none: the first norm sums x itself
            for i, layer in enumerate(self.layers):
                x, sumsq = layer.decode(x, sumsq, meta, rows if i == last else None)
            self._final = (x, sumsq)
            return x
        self._final = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, meta, rows if i == last else None)
        return x if residual is None else x + residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head (one GEMV at decode). When `hidden` is the very stream
        the last decode forward returned, the norm takes the sums of squares its GEMV left."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        sumsq = self._final[1] if self._final is not None and self._final[0] is hidden else None
        return linear(hidden, weight, norm=self.norm, norm_sumsq=sumsq)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; every parameter (each part of a merged one) must be filled."""
        params = dict(self.named_parameters())
        expected = set()
        for name in params:
            owner = self.get_submodule(name.rpartition(".")[0])
            parts = len(owner.out_sizes) if isinstance(owner, Linear) else 1
            expected |= {f"{name}#{p}" for p in range(parts)}
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            module_name, _, kind = name.rpartition(".")
            owner, _, leaf = module_name.rpartition(".")
            if leaf in self.MERGED:
                merged, part = self.MERGED[leaf]
                module_name = f"{owner}.{merged}"
            else:
                part = 0
            target = f"{module_name}.{kind}"
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            module = self.get_submodule(module_name)
            if isinstance(module, Linear):
                module.load(kind, tensor, part)
            else:
                if params[target].shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(params[target].shape)}")
                params[target].data.copy_(tensor)
            loaded.add(f"{target}#{part}")
        missing = sorted(expected - loaded)
        if missing:
            raise KeyError("checkpoint lacks tensors: " + ", ".join(m.split("#")[0] for m in missing[:8]))
        for module in self.modules():
            if isinstance(module, Linear):
                module.finalize()
