"""One decode token through a Llama-family model's packed int4 CPU layers, in straight-line torch.

A single stream's decode step on the CPU is ~60 small ops a layer around four int4 GEMVs, and the
module calls, residual-stream objects and backend dispatch between them cost about as much as the
ops (BENCHMARKS.md, 2026-12-07, seventeenth session). This runs the very same ops in the same order
(so the same bits) from per-layer tuples gathered once, with none of that in between. The model
uses it only where every piece is what it stands in for (`CpuDecode.build`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuili.kernels import cpu_vnni, reference
from tuili.layers.attention import AttentionMetadata, TorchAttention
from tuili.layers.backend import TorchBackend
from tuili.layers.linear import Int4CpuMethod

SERIAL_ATTENTION = True  # the attention's small ops on one thread (see CpuDecode.run)
HISTORY_ROWS = 256  # the kept keys' first capacity per layer (doubled as a sequence grows)


def _int4_gemv(layer):
    """The 4-bit GEMV (x -> y) of a bias-free layer on the int4 CPU method; None otherwise."""
    m = layer.method
    if type(m) is not Int4CpuMethod or layer.bias is not None or getattr(layer, "reduces", False):
        return None
    return m.gemv


class CpuDecode:
    """The layers' weights as plain tuples, and a `run` that decodes one token through them."""

    def __init__(self, embed: torch.Tensor, layers: list[tuple], eps: float, nh: int, nkv: int,
                 d: int, intermediate: int):
        self.embed, self.layers, self.eps = embed, layers, eps
        self.nh, self.nkv, self.d, self.intermediate = nh, nkv, d, intermediate
        self._bound: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see _caches
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The sequence's keys and values so far in float32, per layer [capacity, kv_heads, d]:
        # what single_decode gathers from the cache and widens each step, kept from step to
        # step (a step appends its own). _known: the cache slots they hold, None: none held.
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._known: torch.Tensor | None = None
        # Per layer (norm weights, packed qkv, o, gate_up, down) for kernels/cpu_vnni's
        # decode_layer, where every projection is on its 4-bit kernel; None: the torch ops below.
        self.fused: list[tuple] | None = None

    @classmethod
    def build(cls, model, plain: tuple[type, type]) -> CpuDecode | None:
        """The fast path of a LlamaForCausalLM whose every layer is the plain Llama layer
        (`plain`: its layer and MLP classes) on the torch backend with int4 CPU projections (no
        biases, no q/k norms, no sliding windows, one rank); None where anything differs."""
        tp = getattr(model.embed_tokens, "tp", None)  # other families embed otherwise
        if type(model.backend) is not TorchBackend or tp is None or tp.size != 1:
            return None
        layers, fused, eps = [], [], model.norm.eps
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if (type(layer), type(mlp)) != plain:
                return None
            inner = attn.attn
            if (attn.q_norm is not None or type(inner.backend) is not TorchAttention
                    or inner.window or inner.local_rope or not inner.rotary
                    or {layer.input_layernorm.eps, layer.post_attention_layernorm.eps} != {eps}):
                return None
            projections = [_int4_gemv(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                   mlp.down_proj)]
            if None in projections:
                return None
            layers.append((layer.input_layernorm.weight, projections[0], inner, projections[1],
                           layer.post_attention_layernorm.weight, *projections[2:]))
            methods = [p.method for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                          mlp.down_proj)]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if all(m.vnni is not None for m in methods) and \
                    all(w.dtype == torch.bfloat16 for w in norms):
                fused.append((*norms, *(m.tensors[0] for m in methods)))
        first = model.layers[0].self_attn
        fast = cls(model.embed_tokens.weight, layers, eps, first.nh, first.nkv, first.d,
                   model.layers[0].mlp.gate_up_proj.out_sizes[0])
        fast.fused = fused if len(fused) == len(layers) else None
        return fast

    def serves(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether the step is one sequence's one decode token that single_decode attends."""
        if input_ids.shape[0] != 1 or meta.num_decodes != 1 or meta.prefills:
            return False
        inner = self.layers[0][2]
        return TorchAttention.single_decode_slots(inner, meta) is not None

    def forget(self) -> None:
        """Drop the kept keys: the model ran another kind of step (another sequence's prefill,
        a batch), after which the next single decode may be anyone's."""
        self._known = None

    def _kept(self, slots: torch.Tensor) -> bool:
        """Whether the kept keys are those at all of `slots` but the new last one (then the
        step appends its own); else make room to take them all again."""
        n = slots.shape[0]
        known = self._known
        self._known = slots
        if known is not None and known.shape[0] == n - 1 and torch.equal(known, slots[:-1]):
            if n <= self._history[0][0].shape[0]:
                return True
            grown = [(_grow(k, n), _grow(v, n)) for k, v in self._history]
            self._history = grown
            return True
        if not self._history or self._history[0][0].shape[0] < n:
            size = (max(n, HISTORY_ROWS), self.nkv, self.d)
            self._history = [(torch.empty(size, dtype=torch.float32),
                              torch.empty(size, dtype=torch.float32)) for _ in self.layers]
        return False

    def _caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's K and V caches as [slots, kv_heads, d] (made again if the runner binds
        new ones)."""
        bound = [(layer[2].k_cache, layer[2].v_cache) for layer in self.layers]
        if self._bound is None or any(a is not b for pair, old in zip(bound, self._bound)
                                      for a, b in zip(pair, old)):
            self._bound = bound
            self._known = None
            self._views = [(k.view(-1, self.nkv, self.d), v.view(-1, self.nkv, self.d))
                           for k, v in bound]
        return self._views

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden stream [1, hidden] after the last layer (before the final norm)."""
        caches = self._caches()
        if self.fused is not None and caches[0][0].dtype == torch.bfloat16:
            return self._run_fused(input_ids, meta, caches)
        return self._run_ops(input_ids, meta, caches)

    def _run_fused(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                   caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The step as one C++ call a layer (kernels/cpu_vnni.cpp decode_layer): ~50 torch ops a
        layer fewer. Its residual stream is float32 (the ops' is 16-bit), its GEMVs' inputs int8."""
        slots = TorchAttention.single_decode_slots(self.layers[0][2], meta)
        n = slots.shape[0]
        if not self._kept(slots):  # the earlier keys from the cache; the step adds its own
            for (k_cache, v_cache), (k_all, v_all) in zip(caches, self._history):
                k_all[:n - 1].copy_(k_cache.index_select(0, slots[:-1]))
                v_all[:n - 1].copy_(v_cache.index_select(0, slots[:-1]))
        cos, sin = (t.reshape(-1).float() for t in meta.folded_cos_sin)
        slot, scale = int(meta.slot_mapping[0]), self.layers[0][2].scale
        layer_step = cpu_vnni.module().decode_layer
        x = F.embedding(input_ids, self.embed)[0].float()
        nh, nkv, d, eps, inter = self.nh, self.nkv, self.d, self.eps, self.intermediate
        for (in_w, post_w, qkv, o, gate_up, down), (k_cache, v_cache), (k_all, v_all) in zip(
                self.fused, caches, self._history):
            layer_step(x, in_w, post_w, eps, qkv, o, gate_up, down, cos, sin, k_cache, v_cache,
                       slot, k_all, v_all, n, scale, nh, nkv, d, inter)
        return x.to(self.embed.dtype)[None]

    def _run_ops(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                 caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        nh, nkv, d, eps = self.nh, self.nkv, self.d, self.eps
        cos, sin = meta.folded_cos_sin
        slot = meta.slot_mapping
        inner = self.layers[0][2]
        slots = TorchAttention.single_decode_slots(inner, meta)
        half, qk_rows, group, width = d // 2, nh + nkv, nh // nkv, nh + 2 * nkv
        # More threads make the attention's bmm and softmax fork for a few microseconds of work
        # (17 us against 11 for one bmm, 2-thread idle VM; far worse on a loaded one): those run
        # on this thread alone, the same bits (tests/test_cpu_decode_ops.py).
        threads = torch.get_num_threads()
        one = threads > 1 and SERIAL_ATTENTION
        x = F.embedding(input_ids, self.embed)
        dtype = x.dtype
        residual = None
        n, inter = slots.shape[0], self.intermediate
        kept = self._kept(slots)
        try:
            for (in_w, qkv_proj, attn, o_proj, post_w, gate_up, down), \
                    (k_cache, v_cache), (k_all, v_all) in zip(self.layers, caches, self._history):
                x = x if residual is None else x + residual
                residual = x
                # reference.rms_norm's ops (its mean is a sum and a division, as aten's is)
                h = x.float()
                h.mul_((h * h).sum(-1, keepdim=True).div_(h.shape[-1]).add_(eps).rsqrt_())
                qkv = qkv_proj(in_w * h.to(dtype)).view(1, width, d)
                qk = qkv[:, :qk_rows]
                qk = qk * cos + qk.roll(half, -1) * sin
                if one:
                    torch.set_num_threads(1)
                k_cache.index_copy_(0, slot, qk[:, nh:])
                v_cache.index_copy_(0, slot, qkv[:, qk_rows:])
                # reference.single_decode, its gathered and widened keys kept from the last step
                k, v = k_all[:n], v_all[:n]
                if kept:
                    k[-1].copy_(qk[0, nh:])
                    v[-1].copy_(qkv[0, qk_rows:])
                else:
                    k.copy_(k_cache.index_select(0, slots))
                    v.copy_(v_cache.index_select(0, slots))
                scores = torch.bmm(qk[0, :nh].view(nkv, group, d).float(),
                                   k.permute(1, 2, 0)).mul_(attn.scale)
                out = torch.bmm(torch.softmax(scores, -1), v.transpose(0, 1))
                if one:
                    torch.set_num_threads(threads)
                x = o_proj(out.view(1, nh * d).to(dtype))
                x = x + residual
                residual = x
                h = x.float()
                h.mul_((h * h).sum(-1, keepdim=True).div_(h.shape[-1]).add_(eps).rsqrt_())
                gu = gate_up(post_w * h.to(dtype))
                x = down(F.silu(gu[:, :inter]) * gu[:, inter:])
        finally:  # however the step ends, the threads it began with
            if one:
                torch.set_num_threads(threads)
        return x + residual


def _grow(kept: torch.Tensor, need: int) -> torch.Tensor:
    """`kept` in a buffer of twice its rows (at least `need`), its rows copied."""
    out = kept.new_empty((max(need, 2 * kept.shape[0]), *kept.shape[1:]))
    out[:kept.shape[0]].copy_(kept)
    return out
