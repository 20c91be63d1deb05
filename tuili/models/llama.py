"""The Llama family: Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Checkpoint names follow HF transformers; q/k/v and gate/up load into merged projections.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tuili.distributed.group import SINGLE, TensorParallel
from tuili.layers.attention import Attention, AttentionMetadata
from tuili.layers.backend import TORCH, Backend
from tuili.layers.hidden_tap import HiddenTap
from tuili.layers.linear import Linear, default_weight_loader
from tuili.layers.norm import RMSNorm
from tuili.layers.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                   VocabParallelEmbedding, qkv_shards)
from tuili.layers.residual import stream as residual_stream
from tuili.models.config import ModelConfig
from tuili.models.cpu_decode import CpuDecode


class LlamaAttention(nn.Module):
    """This rank's query heads and the KV heads they read (all of them on one rank)."""

    def __init__(self, c: ModelConfig, backend: Backend, tp: TensorParallel = SINGLE):
        super().__init__()
        self.d = c.head_dim
        shards = qkv_shards(c.num_heads, c.num_kv_heads, c.head_dim, tp)
        self.nh, self.nkv = shards[0][1] // self.d, shards[1][1] // self.d
        self.qkv_proj = ColumnParallelLinear(
            c.hidden_size, [c.num_heads * self.d, c.num_kv_heads * self.d,
                            c.num_kv_heads * self.d], tp, bias=c.attention_bias, shards=shards)
        self.o_proj = RowParallelLinear(c.num_heads * self.d, c.hidden_size, tp)
        self.q_norm = RMSNorm(self.d, c.rms_norm_eps, backend) if c.qk_norm else None
        self.k_norm = RMSNorm(self.d, c.rms_norm_eps, backend) if c.qk_norm else None
        self.attn = Attention(self.nh, self.nkv, self.d, backend.attention)

    def forward(self, stream, norm: RMSNorm, meta: AttentionMetadata,
                rows: torch.Tensor | None = None):
        """stream + o_proj(attention(qkv_proj(norm(stream)))). Given `rows`, o_proj runs on those
        rows alone and only they stay in the stream (every token's K/V is stored all the same)."""
        qkv, stream = stream.project(norm, self.qkv_proj, keep=rows)
        qkv = qkv.view(qkv.shape[0], self.nh + 2 * self.nkv, self.d)
        out = self.attn(qkv, meta, self.q_norm, self.k_norm)
        if rows is not None:
            out = out.index_select(0, rows)
        return stream.add(self.o_proj, out)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(c.hidden_size, [c.intermediate_size] * 2, tp)
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, tp)

    def forward(self, stream, norm: RMSNorm):
        """stream + down(silu(gate) * up) of norm(stream)."""
        h, stream = stream.project(norm, self.gate_up_proj, gated=True)
        return stream.add(self.down_proj, h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, backend: Backend, tp: TensorParallel = SINGLE,
                 mlp: nn.Module | None = None):
        """`mlp`: the feed-forward block (a MoE block, say) in place of LlamaMLP; it maps
        (stream, norm) to the stream."""
        super().__init__()
        self.self_attn = LlamaAttention(c, backend, tp)
        self.mlp = mlp if mlp is not None else LlamaMLP(c, tp)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)

    def forward(self, stream, meta: AttentionMetadata, rows: torch.Tensor | None = None):
        """The residual stream (layers/residual.py) in and out. Given `rows`, only those rows come
        out (see LlamaForCausalLM)."""
        stream = self.self_attn(stream, self.input_layernorm, meta, rows)
        return self.mlp(stream, self.post_attention_layernorm)


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our module path, part index of the merged layer)
    MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    supports_tensor_parallel = True
    supports_int8_cpu_head = True  # its head may run in int8 on the CPU int4 path (loader.py)

    @staticmethod
    def config_from_hf(cfg: dict) -> ModelConfig:
        """Qwen2 has q/k/v biases unless its config says otherwise; Qwen3 normalises q and k."""
        arch = cfg["architectures"][0]
        return ModelConfig.from_hf(
            cfg, attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM")

    def __init__(self, c: ModelConfig, backend: Backend = TORCH, tp: TensorParallel = SINGLE):
        """tp: this rank's shard of every layer (layers/parallel.py); the same code on each."""
        super().__init__()
        self.config, self.backend = c, backend
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, backend, tp, self.make_mlp(c, i, backend))
                                    for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)
        self.lm_head = ParallelLMHead(c.hidden_size, c.vocab_size, tp,
                                      tied=self.embed_tokens if c.tie_word_embeddings else None)
        # The last stream and its sums of squares (decode GEMVs), for the final norm in `logits`.
        self._final: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.tap: HiddenTap | None = None  # hidden states for an EAGLE head (None: none taken)
        self.cpu_decode: CpuDecode | None = None  # a single stream's decode step (cpu_decode.py)

    def make_mlp(self, c: ModelConfig, layer: int, backend: Backend) -> nn.Module | None:
        """Layer `layer`'s feed-forward block; None: the dense LlamaMLP (families override this)."""
        return None

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden stream [tokens, hidden] after the last layer; `logits` applies the final norm.
        Given `rows`, only those tokens' states [len(rows), hidden]: every layer still stores every
        token's K/V, but the last one runs o_proj and its MLP on those rows alone (for a 32-layer
        prompt that is ~3% of the prefill's matmuls saved)."""
        last, tap, fast = len(self.layers) - 1, self.tap, self.cpu_decode
        if fast is not None and tap is None and fast.serves(input_ids, meta):
            hidden = fast.run(input_ids, meta)  # its one row is the sampled one (rows)
            self._final = (hidden, None)
            return hidden
        if fast is not None:
            fast.forget()  # a step of another kind: the next single decode may be anyone's
        stream = residual_stream(self.backend, self.embed_tokens(input_ids))
        if tap is not None:
            return self._forward_tapped(stream, meta, rows, tap)
        for i, layer in enumerate(self.layers):
            stream = layer(stream, meta, rows if i == last else None)
        hidden = stream.hidden()
        self._final = (hidden, stream.sumsq)
        return hidden

    def _forward_tapped(self, stream, meta: AttentionMetadata, rows: torch.Tensor | None,
                        tap: HiddenTap) -> torch.Tensor:
        """forward, every row through every layer, the tap's states of all rows taken."""
        states = {}
        for i, layer in enumerate(self.layers):
            if i in tap.layers:
                states[i] = stream.hidden()
            stream = layer(stream, meta)
        hidden = stream.hidden()
        if len(self.layers) in tap.layers:
            states[len(self.layers)] = self.norm(hidden)
        tap.take([states[i] for i in tap.layers])
        if rows is None:
            self._final = (hidden, stream.sumsq)
            return hidden
        hidden = hidden.index_select(0, rows)
        self._final = (hidden, None)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head (one GEMV at decode). When `hidden` is the very stream
        the last forward returned, the norm takes the sums of squares its GEMV left (if any)."""
        sumsq = self._final[1] if self._final is not None and self._final[0] is hidden else None
        return self.lm_head.gather(self.backend.linear(hidden, self.lm_head, norm=self.norm,
                                                       norm_sumsq=sumsq))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm alone: the states HF calls last_hidden_state (for pooling)."""
        return self.norm(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; every parameter (each part of a merged one) must be filled."""
        params = dict(self.named_parameters())
        expected = set()
        for name, param in params.items():
            if not getattr(param, "optional", False):  # e.g. GPTQ's g_idx
                expected |= {f"{name}#{p}" for p in range(getattr(param, "num_parts", 1))}
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, parts = self.checkpoint_target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if hasattr(tensor, "materialize") and not getattr(param, "reads_slices", False):
                tensor = tensor.materialize()  # replicated on every rank: read whole
            try:
                if parts is None:  # the whole parameter at once (e.g. experts already stacked)
                    default_weight_loader(param, tensor)
                    parts = range(getattr(param, "num_parts", 1))
                else:
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor, parts)
                    parts = [parts]
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            loaded |= {f"{target}#{p}" for p in parts}
        missing = sorted(expected - loaded)
        if missing:
            raise KeyError("checkpoint lacks tensors: " + ", ".join(m.split("#")[0] for m in missing[:8]))
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading()
        self.cpu_decode = CpuDecode.build(self, (LlamaDecoderLayer, LlamaMLP))

    def checkpoint_target(self, name: str) -> tuple[str, int | None]:
        """(our parameter, part of it) for a checkpoint tensor's name (without "model.");
        part None: the tensor fills the whole parameter."""
        module_name, _, kind = name.rpartition(".")
        owner, _, leaf = module_name.rpartition(".")
        if leaf in self.MERGED:
            merged, part = self.MERGED[leaf]
            return f"{owner}.{merged}.{kind}", part
        return f"{module_name}.{kind}", 0
