"""parallelism.tensor: a model's linear layers split over the tensor-parallel ranks, from outside the model.

The model names which layers split by columns (each rank computes some of the outputs: whole attention
heads, some of the MLP's hidden units) and which by rows (each rank takes its part of the inputs, and an
all-reduce sums their outputs): `raybig_tp_plan()`, paths in the model with * for any block index.
raybig's transformer and BlockModel declare theirs; a Hugging Face model's comes from its config
(`base_model_tp_plan`); a python model may define one. torch.distributed.tensor.parallel does the rest:
activations between the split layers stay plain tensors, replicated on every rank of the group."""
from __future__ import annotations

from fnmatch import fnmatch

from torch import nn

STYLES = ("colwise", "rowwise")


class NoTensorPlan(ValueError):
    """The model cannot be split tensor-parallel, and why."""


def tensor_plan(model: nn.Module) -> dict[str, str]:
    declared = getattr(model, "raybig_tp_plan", None)
    if not callable(declared):
        raise NoTensorPlan(f"{type(model).__name__} declares no tensor-parallel plan (define raybig_tp_plan(): "
                           "linear layers' paths to 'colwise' or 'rowwise'; see docs/parallelism.md)")
    try:
        plan = dict(declared())
    except ValueError as err:
        raise NoTensorPlan(str(err)) from None
    bad = sorted({style for style in plan.values()} - set(STYLES))
    if not plan or bad:
        raise NoTensorPlan(f"{type(model).__name__}.raybig_tp_plan() gives {'styles ' + ', '.join(bad) if bad else 'nothing'}"
                           f": each linear layer's path maps to one of {', '.join(STYLES)}")
    return plan


def planned_layers(model: nn.Module, plan: dict[str, str]) -> list[tuple[str, nn.Module, str]]:
    """(path, module, style) of every module a plan entry matches (* matches one path element)."""
    out = []
    for name, module in model.named_modules():
        for pattern, style in plan.items():
            if len(name.split(".")) == len(pattern.split(".")) and all(
                    fnmatch(a, b) for a, b in zip(name.split("."), pattern.split("."))):
                out.append((name, module, style))
    return out


def tensor_problems(model: nn.Module, degree: int) -> list[str]:
    """Why `model` cannot be split over `degree` ranks; nothing when it can."""
    try:
        plan = tensor_plan(model)
    except NoTensorPlan as err:
        return [str(err)]
    layers = planned_layers(model, plan)
    if not layers:
        return [f"its tensor-parallel plan ({', '.join(plan)}) matches no module of {type(model).__name__}"]
    out = []
    for path, module, style in layers:
        if not isinstance(module, nn.Linear):
            out.append(f"{path} is a {type(module).__name__}: only linear layers split {style}")
            continue
        width = module.out_features if style == "colwise" else module.in_features
        if width % degree:
            out.append(f"{degree} does not divide {path}'s {'outputs' if style == 'colwise' else 'inputs'} ({width})")
    heads = getattr(model, "raybig_tp_heads", None)
    for field, count in (heads() if callable(heads) else {}).items():
        if count % degree:
            out.append(f"{degree} does not divide {field} {count}: each rank takes whole heads")
    return out


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """The plan applied in place: each matched linear layer's weight (and bias) becomes a DTensor sharded over
    `tp_mesh`. Every rank built the same weights from the same seed, so each keeps its slice (no broadcast)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {path: styles[style]() for path, style in tensor_plan(model).items()}
    parallelize_module(model, tp_mesh, plan, src_data_rank=None)
