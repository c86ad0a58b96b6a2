"""Every raybig model is an ordered list of blocks, so parallelism can cut it into stages from outside."""
from __future__ import annotations

import torch
from torch import nn

from raybig.models.parts import Part, module_part


class BlockModel(nn.Module):
    """A model whose forward is its blocks applied in order; `blocks[i:j]` is a valid sub-model."""

    def __init__(self, blocks: list[nn.Module], kind: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def raybig_parts(self) -> list[Part]:
        """One part per block; the repeated ones (a transformer's layers, not its embedding or head) are the
        model's blocks in the protocol's sense."""
        kinds = [type(block) for block in self.blocks]
        return [module_part(f"blocks.{i}", block, block=kinds.count(type(block)) > 1)
                for i, block in enumerate(self.blocks)]

    def raybig_tp_plan(self) -> dict[str, str]:
        """The blocks' own tensor-parallel plans (a TP_PLAN of paths in the block), at their paths here."""
        return {f"blocks.{i}.{path}": style for i, block in enumerate(self.blocks)
                for path, style in getattr(block, "TP_PLAN", {}).items()}


class Reshape(nn.Module):
    """Gives a flat or (T, F) sample the shape the next layer wants, keeping the batch dimension."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)
