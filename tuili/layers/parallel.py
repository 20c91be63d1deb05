"""Tensor-parallel layers: each rank holds a shard and loads only it (its weight_loader narrows the
checkpoint tensor). Over one rank (SINGLE) each is exactly the plain layer.

- ColumnParallelLinear: output features split (QKV, gate/up); no collective.
- RowParallelLinear: input features split (o_proj, down); one all-reduce of the partial sums.
- VocabParallelEmbedding, ParallelLMHead: vocabulary rows split (padded to a multiple of the
  ranks); the embedding all-reduces, the head's logits are gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuili.distributed.group import SINGLE, TensorParallel
from tuili.layers.embedding import Embedding
from tuili.layers.int4 import GROUP, Int4Weight
from tuili.layers.linear import Linear


def take(tensor, dim: int, start: int, n: int):
    """Rows (dim 0) or columns (dim 1) start..start+n of a checkpoint tensor: a torch tensor, a
    GGUF 4-bit one (cut packed in whole groups, else dequantized to be cut), or a tensor not
    read yet (a safetensors slice, models/shard_reader.py, or a GGUF one, models/gguf_file.py:
    they read just these). The whole tensor passes through as it came."""
    if start == 0 and tensor.shape[dim] == n:
        return tensor.materialize() if hasattr(tensor, "materialize") else tensor
    if isinstance(tensor, Int4Weight) and dim == 1 and (start % GROUP or n % GROUP):
        tensor = tensor.dequantize()
    return tensor.narrow(dim, start, n)


def take_packed(tensor, dim: int | None, start: int, n: int, per: int, what: str):
    """take() along `dim` of a packed or grouped tensor holding `per` features an element (GPTQ
    words: 8 input rows; scales: one group): features start..start+n, whole elements only. dim
    None: the tensor is not split along these features (every rank reads all of it)."""
    if dim is None:
        return tensor
    if start == 0 and -(-n // per) == tensor.shape[dim]:  # all of it (its last element partial?)
        return take(tensor, dim, 0, tensor.shape[dim])
    if start % per or n % per:
        raise ValueError(f"this rank's {what} {start}..{start + n} do not fall on the "
                         f"checkpoint's boundaries of {per} (packed or grouped); choose a "
                         "tensor_parallel_size whose shards hold whole ones")
    return take(tensor, dim, start // per, n // per)


def _mark(param: nn.Parameter | None) -> None:
    if param is not None:
        param.reads_slices = True  # its loader narrows a not-yet-read slice itself


class ColumnParallelLinear(Linear):
    """Each rank's rows of every output part. shards: per part, (first row, rows) of this
    rank's share of the checkpoint's part (default: an even split)."""

    def __init__(self, in_features: int, out_sizes: int | list[int], tp: TensorParallel = SINGLE,
                 bias: bool = False, shards: list[tuple[int, int]] | None = None,
                 weight: nn.Parameter | None = None):
        full = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        self.shards = shards or [(tp.rank * tp.shard(n, "output features"), n // tp.size)
                                 for n in full]
        super().__init__(in_features, [rows for _, rows in self.shards], bias, weight)
        self.tp = tp
        _mark(self.weight if weight is None else None)
        _mark(self.bias)

    def shard_of(self, tensor, part: int = 0, out_dim: int | None = 0, out_per: int = 1,
                 in_dim: int | None = 1, in_per: int = 1):
        """Part `part`'s rows of a checkpoint tensor whose output features lie along out_dim,
        out_per of them an element (a quantized format's packed or grouped tensors)."""
        start, rows = self.shards[part]
        return take_packed(tensor, out_dim, start, rows, out_per, "output features")

    def weight_loader(self, param: nn.Parameter, tensor, part: int = 0) -> None:
        super().weight_loader(param, self.shard_of(tensor, part), part)


class RowParallelLinear(Linear):
    """Each rank's columns of the weight (its slice of the input features: its heads' outputs,
    its share of the MLP); the partial products are summed over ranks (no bias)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = SINGLE):
        n = tp.shard(in_features, "input features")
        super().__init__(n, out_features)
        self.tp, self.in_start, self.in_full = tp, tp.rank * n, in_features
        # The decode GEMV's residual epilogue must wait for the sum (layers/backend.py).
        self.reduces = tp.size > 1
        _mark(self.weight)

    def shard_of(self, tensor, part: int = 0, out_dim: int | None = 0, out_per: int = 1,
                 in_dim: int | None = 1, in_per: int = 1):
        """This rank's columns of a checkpoint tensor whose input features lie along in_dim,
        in_per of them an element (GPTQ's words, a group's scales)."""
        return take_packed(tensor, in_dim, self.in_start, self.in_features, in_per,
                           "input features")

    def weight_loader(self, param: nn.Parameter, tensor, part: int = 0) -> None:
        super().weight_loader(param, self.shard_of(tensor, part), part)

    def row_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """Over every rank's columns: one rank quantizes as the whole layer would (the same
        per-channel scales at any tensor_parallel_size)."""
        return self.tp.all_max(w.abs().amax(-1).float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.method.apply(self, x))


def vocab_shard(vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """(first id, rows per rank): the vocabulary padded up to a multiple of the ranks."""
    rows = -(-vocab_size // tp.size)
    return tp.rank * rows, rows


class VocabParallelEmbedding(Embedding):
    """This rank's rows of the table; ids of other ranks look up zeros, summed over ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        start, rows = vocab_shard(vocab_size, tp)
        super().__init__(rows, hidden_size)
        self.tp, self.vocab_size, self.start = tp, vocab_size, start
        if tp.size > 1:
            self.weight.weight_loader = self.weight_loader
            _mark(self.weight)

    def weight_loader(self, param: nn.Parameter, tensor, part: int = 0) -> None:
        if tensor.shape[0] != self.vocab_size or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {self.vocab_size} rows of "
                             f"{tuple(param.shape[1:])}")
        real = max(0, min(param.shape[0], self.vocab_size - self.start))
        param.data.zero_()  # padding rows: the head's logits there are cut off
        if real:
            param.data[:real].copy_(take(tensor, 0, self.start, real))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0))


class ParallelLMHead(ColumnParallelLinear):
    """Logits of this rank's vocabulary rows; `gather` puts every rank's side by side (every
    rank gets them; rank 0 samples). Tied: the embedding's shard is its weight."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel = SINGLE,
                 tied: VocabParallelEmbedding | None = None):
        start, rows = vocab_shard(vocab_size, tp)
        real = max(0, min(rows, vocab_size - start))
        super().__init__(hidden_size, rows if tp.size > 1 else vocab_size, tp,
                         shards=[(start, rows)],
                         weight=tied.weight if tied is not None else None)
        self.vocab_size, self.real_rows = vocab_size, real

    def weight_loader(self, param: nn.Parameter, tensor, part: int = 0) -> None:
        if self.tp.size == 1:
            return Linear.weight_loader(self, param, tensor, part)
        start, rows = self.shards[0]
        param.data.zero_()
        if self.real_rows:
            param.data[:self.real_rows].copy_(take(tensor, 0, start, self.real_rows))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[:, :self.vocab_size]


def qkv_shards(num_heads: int, num_kv_heads: int, head_dim: int,
               tp: TensorParallel) -> list[tuple[int, int]]:
    """This rank's rows of q, k and v: its share of the query heads, and of the KV heads, or
    (fewer KV heads than ranks) the one KV head its query heads attend with, replicated."""
    q = tp.shard(num_heads, "attention heads")
    if num_kv_heads >= tp.size:
        kv = tp.shard(num_kv_heads, "KV heads")
        first = tp.rank * kv
    else:
        if tp.size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads cannot be replicated evenly over "
                             f"tensor_parallel_size={tp.size}; choose a multiple of them")
        kv, first = 1, tp.rank // (tp.size // num_kv_heads)
    d = head_dim
    return [(tp.rank * q * d, q * d), (first * d, kv * d), (first * d, kv * d)]
