"""The one model protocol parallelism needs: a model's forward as a chain of parts.

A part is a module (or a few) at its path in the model plus how it maps the running activation to the next;
the model's forward is its parts applied in order. Pipeline stages are runs of consecutive parts; the parts
that are a model's repeated blocks are where FSDP units and activation checkpoints go.

Where the parts come from:
- raybig's own models (BlockModel): one part per block;
- a Hugging Face model (raybig.models.hf): the embedding, each decoder layer, the final norm and head;
- a module of the user's: its `raybig_parts()` method if it defines one; otherwise what it registers before
  its block list, each block, and what it registers after, accepted only if that chain reproduces the
  module's own forward on a probe batch (`check_parts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class NoParts(ValueError):
    """The model cannot be cut into parts, and why: it still trains data-parallel."""


@dataclass
class Part:
    modules: dict[str, nn.Module]  # path in the full model -> the module there that this part uses
    run: Callable[[torch.Tensor], torch.Tensor]
    block: bool = True  # one of the model's repeated blocks (not an embedding or a head)

    @property
    def name(self) -> str:
        return type(next(iter(self.modules.values()))).__name__

    @property
    def parameters(self) -> int:
        return sum(p.numel() for m in self.modules.values() for p in m.parameters())


def module_part(path: str, module: nn.Module, block: bool = True) -> Part:
    return Part({path: module}, module, block)


def model_parts(model: nn.Module, blocks_name: str | None = None) -> list[Part]:
    """The model's parts (see the module docstring); NoParts says why there are none."""
    declared = getattr(model, "raybig_parts", None)
    if callable(declared):
        return list(declared())
    return registered_parts(model, blocks_name)


def registered_parts(model: nn.Module, blocks_name: str | None) -> list[Part]:
    """A module's children in registration order, with its block list expanded into one part per block."""
    children = list(model.named_children())
    lists = [name for name, child in children if isinstance(child, nn.ModuleList)]
    if blocks_name is None:
        if len(lists) != 1:
            found = f"{len(lists)} ({', '.join(lists)})" if lists else "none"
            raise NoParts(f"{type(model).__name__} has no single nn.ModuleList of blocks among its children "
                          f"(found {found}); name it with model.blocks")
        blocks_name = lists[0]
    elif blocks_name not in dict(children) or not isinstance(dict(children)[blocks_name], nn.ModuleList):
        raise NoParts(f"{type(model).__name__} has no child nn.ModuleList named {blocks_name!r} "
                      f"(children: {', '.join(n for n, _ in children)})")
    parts = []
    for name, child in children:
        if name == blocks_name:
            parts += [module_part(f"{name}.{i}", block) for i, block in enumerate(child)]
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            raise NoParts(f"{type(model).__name__}.{name} is an {type(child).__name__} besides the blocks: "
                          "raybig cannot tell how forward uses it")
        else:
            parts.append(module_part(name, child, block=False))
    return parts


def probe_batch(meta) -> torch.Tensor:
    """Two samples of the data's shape (token ids for a language model): enough to run any model once."""
    return torch.zeros(2, *meta.shape, dtype=torch.long if meta.task == "lm" else torch.float32)


def run_parts(parts: list[Part], x: torch.Tensor) -> torch.Tensor:
    for part in parts:
        x = part.run(x)
    return x


def check_parts(model: nn.Module, parts: list[Part], probe: torch.Tensor, forward=None) -> None:
    """The chain of parts must compute what the model computes (`forward`, default the model's own call) on
    `probe`, in eval mode so dropout cannot differ; a forward doing work between its modules would not."""
    forward = forward or model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                chained = run_parts(parts, probe)
            except Exception as err:
                raise NoParts(f"running its children one after another fails ({type(err).__name__}: {err}): "
                              "its forward does more than call them in order") from None
            own = forward(probe)
    finally:
        model.train(was_training)
    if not isinstance(chained, torch.Tensor) or chained.shape != own.shape:
        got = list(chained.shape) if isinstance(chained, torch.Tensor) else type(chained).__name__
        raise NoParts(f"its children applied in order give {got}, its forward {list(own.shape)}: its forward "
                      "does more than call them in order")
    if not torch.allclose(chained, own, rtol=1e-4, atol=1e-5):
        diff = float((chained - own).abs().max())
        raise NoParts(f"its children applied in order differ from its forward by up to {diff:.3g} on a probe "
                      "batch: its forward does more than call them in order (define raybig_parts() to say how)")
