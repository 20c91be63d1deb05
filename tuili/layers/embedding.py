import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    """Token id -> row of the table (also the LM head's weight when embeddings are tied)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
