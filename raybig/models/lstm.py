from __future__ import annotations

import torch
from torch import nn


class LSTMLayer(nn.Module):
    """One LSTM layer that hands its whole output sequence to the next block."""

    def __init__(self, inputs: int, hidden: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lstm(x)[0])


class LastStep(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def lstm_blocks(spec, meta, dropout: float) -> list[nn.Module]:
    """A sequence classifier: samples of shape [T, F] (digits: 8 rows of 8 pixels) read row by row."""
    if len(meta.shape) != 2:
        raise ValueError(f"an lstm needs sequence-shaped samples [T, F], got {meta.shape}")
    width = meta.shape[1]
    blocks: list[nn.Module] = []
    for _ in range(spec.layers):
        blocks.append(LSTMLayer(width, spec.hidden, dropout))
        width = spec.hidden
    blocks.append(nn.Sequential(LastStep(), nn.Linear(width, meta.num_classes)))
    return blocks
