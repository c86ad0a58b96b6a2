"""Optimizers, explicit L1/L2 penalties and learning-rate schedules, all from the spec's train section."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def build_optimizer(params, opt) -> torch.optim.Optimizer:
    """`opt` is one of the spec's optimizer sections; `momentum` is SGD with a momentum term. On a GPU, SGD,
    Adam and AdamW take torch's fused kernels (one launch for every parameter); otherwise every optimizer
    takes its foreach form (one call per step for all parameters, not a Python loop over them), which torch
    picks by itself only on a GPU."""
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups, each at its "lr_scale" of the rate
        params = [{**group, "lr": opt.lr * group.get("lr_scale", 1.0)} for group in params]
    flat = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    if len({isinstance(p, DTensor) for p in flat}) > 1:
        params = _by_kind(params if isinstance(params[0], dict) else [{"params": params}])
    on_gpu = bool(flat) and all(p.is_cuda for p in flat)
    fused = {"fused": True} if on_gpu else {"foreach": True}
    each = {"foreach": True}
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, weight_decay=opt.weight_decay, **fused)
    if opt.name == "momentum":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay, **fused)
    if opt.name == "adagrad":
        return torch.optim.Adagrad(params, lr=opt.lr, lr_decay=opt.lr_decay, eps=opt.eps, weight_decay=opt.weight_decay,
                                   **each)
    if opt.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=opt.lr, alpha=opt.alpha, eps=opt.eps, momentum=opt.momentum,
                                   weight_decay=opt.weight_decay, **each)
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                                **fused)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                                 **fused)
    raise ValueError(f"unknown optimizer {opt.name!r}")


def _by_kind(groups: list[dict]) -> list[dict]:
    """A foreach or fused kernel takes DTensors (tensor-parallel shards) or plain tensors, not both: with both,
    each group splits in two, the same in all but its parameters."""
    return [{**group, "params": kept} for group in groups
            for kept in ([p for p in group["params"] if isinstance(p, DTensor) == kind] for kind in (True, False))
            if kept]


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    """Trained weight matrices and kernels only: biases, norms, position tables and frozen weights (under
    LoRA adapters) are not shrunk."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1 and not name.endswith("pos")]


@torch.no_grad()
def add_penalty_gradients(weights: list[torch.Tensor], l1: float, l2: float) -> None:
    """The gradient of l1 * sum|w| + l2 * sum w^2, added after backward.

    Adding it here rather than to the loss gives the same update under every optimizer and every
    layout: it does not pass through the per-microbatch loss scaling of a pipeline schedule, and the
    penalty is computed once per rank over the weights that rank owns.
    """
    if not (l1 or l2):
        return
    for w in weights:
        if w.grad is None:
            continue
        if l1:
            w.grad.add_(torch.sign(w), alpha=l1)
        if l2:
            w.grad.add_(w, alpha=2 * l2)


def build_scheduler(optimizer, schedule, steps_per_epoch: int, total_steps: int):
    """A per-step LambdaLR: optional linear warm-up, then constant, step decay or cosine to min_lr_ratio at
    `total_steps` (train.max_steps, or the steps of train.epochs)."""
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if schedule.warmup_steps and step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.name == "step":
            return schedule.gamma ** (step // (schedule.step_epochs * steps_per_epoch))
        if schedule.name == "cosine":
            span = max(1, total - schedule.warmup_steps)
            progress = min(1.0, (step - schedule.warmup_steps) / span)
            return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_spec_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, opt) -> None:
    """A loaded optimizer state carries the learning rate and coefficients it was saved with; the spec's
    values win, so a resumed run whose lr was edited, or a PBT trial that perturbed its donor's lr and
    weight decay, trains with what its spec says. The scheduler's position is kept."""
    spec_values = build_optimizer([torch.zeros(1, requires_grad=True)], opt).defaults
    scheduler.base_lrs = [opt.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        # how the step runs (fused, foreach) is this optimizer's, not the CPU probe's above
        group.update({k: v for k, v in spec_values.items() if k in group and k not in ("fused", "foreach", "lr")})
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
