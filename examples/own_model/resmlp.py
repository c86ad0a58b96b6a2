"""A model of your own for raybig: any torch.nn.Module, built by a factory raybig calls as
`factory(meta, **model.args)`. `meta` describes the data: meta.task ("classification" or "lm"),
meta.shape (one sample's input shape), meta.num_classes (classes, or the vocabulary size), meta.vocab.

    raybig run jobs/own_model.yaml
    raybig serve runs/own-resmlp --trust-code
"""
import math

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """A stem, a stack of residual blocks, a classifier head; the forward takes a batch of samples and
    returns one row of logits per sample."""

    def __init__(self, inputs: int, classes: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout))
            for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.flatten(1))
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def build(meta, width: int = 128, depth: int = 3, dropout: float = 0.1) -> nn.Module:
    if meta.task != "classification":
        raise ValueError(f"ResidualMLP classifies; this data's task is {meta.task}")
    return ResidualMLP(math.prod(meta.shape), meta.num_classes, width, depth, dropout)
