"""train.activation_checkpointing: each repeated block's forward recomputed in backward instead of kept,
applied in place from outside the model (parameter names, and so checkpoints, are unchanged).

full keeps a block's input alone; selective (torchtitan's op-level policy) keeps what is costly to recompute,
the outputs of matrix multiplies, convolutions and attention, and recomputes the element-wise work between
them (norms, activations, dropout: cheap in time, large in memory)."""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from raybig.models.parts import Part

_aten = torch.ops.aten
SAVED_OPS = {op for op in (
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default,
    getattr(_aten, "_scaled_dot_product_flash_attention", None),
    getattr(_aten, "_scaled_dot_product_efficient_attention", None),
    getattr(_aten, "_scaled_dot_product_cudnn_attention", None),
    getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None),
) if op is not None}


def _keep_costly(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(parts: list[Part], mode: str) -> None:
    """Every block part's module (a decoder layer, not the rotary embedding it shares) checkpointed."""
    if mode == "none":
        return
    for part in parts:
        if part.block:
            _checkpoint_forward(next(iter(part.modules.values())), mode)


def _checkpoint_forward(module: torch.nn.Module, mode: str) -> None:
    forward = module.forward
    contexts = functools.partial(create_selective_checkpoint_contexts, _keep_costly) if mode == "selective" else None

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is kept for a backward anyway
            return forward(*args, **kwargs)
        extra = {"context_fn": contexts} if contexts else {}
        # non-reentrant: takes keyword arguments and parameters that are DTensors; the RNG state is replayed,
        # so dropout masks are the same in the recomputation
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = checkpointed
