from __future__ import annotations

import math

from torch import nn

from raybig.models.blocks import Reshape


def mlp_blocks(spec, meta, dropout: float) -> list[nn.Module]:
    """One block per hidden layer (linear, ReLU, dropout), then the classifier head."""
    width = math.prod(meta.shape)
    blocks: list[nn.Module] = []
    for i, hidden in enumerate(spec.hidden):
        layers = [Reshape(width)] if i == 0 else []
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        blocks.append(nn.Sequential(*layers))
        width = hidden
    blocks.append(nn.Linear(width, meta.num_classes))
    return blocks
