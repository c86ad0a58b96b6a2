from __future__ import annotations

from torch import nn

from raybig.models.blocks import Reshape


def cnn_blocks(spec, meta, dropout: float) -> list[nn.Module]:
    """Conv + ReLU + 2x2 max-pool blocks (one per entry of `channels`), a hidden dense block, the head."""
    shape = list(meta.shape)
    if len(shape) == 2:
        shape = [1, *shape]
    if len(shape) != 3:
        raise ValueError(f"a cnn needs image-shaped samples [H, W] or [C, H, W], got {meta.shape}")
    c, h, w = shape
    blocks: list[nn.Module] = []
    for i, out in enumerate(spec.channels):
        layers = [Reshape(c, h, w)] if i == 0 else []
        layers += [nn.Conv2d(c, out, spec.kernel_size, padding=spec.kernel_size // 2), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        blocks.append(nn.Sequential(*layers))
        c = out
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, spec.hidden), nn.ReLU(), nn.Dropout(dropout)))
    blocks.append(nn.Linear(spec.hidden, meta.num_classes))
    return blocks
