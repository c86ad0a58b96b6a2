"""Fine-tuning (the spec's init_from): a run that starts from trained weights rather than random ones.

Every tensor of the source whose name and shape fit the new model is loaded; the rest of the model keeps its
fresh initialisation (a classifier's head whose class count changed). Freezing is applied from outside, by
parameter name or by the model's parts (raybig.models.parts), and loaded weights may train at a lower rate.
All of it happens to the whole model before it is split or wrapped, so every layout fine-tunes the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from raybig.errors import SpecError

SOURCE = "init_from.source"


def weights_file(source: str, field_name: str = SOURCE) -> Path:
    """A run directory's published model.safetensors, or the .safetensors file named."""
    path = Path(source)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        what = "holds no trained model (no model.safetensors)" if path.is_dir() else "is not a run or a .safetensors file"
        raise SpecError(f"{source} {what}", field_name)
    return file


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the file's header, without reading the weights."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # a truncated or foreign file: safetensors raises its own error types
        raise SpecError(f"{file} cannot be read as safetensors: {err}", SOURCE) from None


@dataclass
class WeightFit:
    """How a source's tensors meet a model's."""
    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)  # in both, with different shapes: kept fresh
    missing: list[str] = field(default_factory=list)  # the model's, not in the source: kept fresh

    def summary(self) -> str:
        out = f"{len(self.loaded)} tensors loaded"
        if self.reshaped:
            out += f"; re-initialised (shape changed): {', '.join(self.reshaped)}"
        if self.missing:
            out += f"; not in the source: {', '.join(self.missing[:6])}{' ...' if len(self.missing) > 6 else ''}"
        return out


def weight_fit(model: nn.Module, file: Path) -> WeightFit:
    shapes = _shapes(file)
    fit = WeightFit()
    for name, tensor in model.state_dict().items():
        if name not in shapes:
            fit.missing.append(name)
        elif shapes[name] != tuple(tensor.shape):
            fit.reshaped.append(name)
        else:
            fit.loaded.append(name)
    if not fit.loaded:
        raise SpecError(f"no tensor of {file} fits this model (names or shapes differ everywhere): was it trained "
                        "as another kind of model?", SOURCE)
    return fit


def frozen_names(model: nn.Module, init, blocks_name: str | None) -> set[str]:
    """The parameters init_from.freeze and init_from.train_last keep fixed (SpecError naming the field that
    cannot be met)."""
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    for i, prefix in enumerate(init.freeze):
        matched = {n for n in names if n == prefix or n.startswith(prefix + ".")}
        if not matched:
            tops = sorted({n.split(".")[0] + ("." + n.split(".")[1] if "." in n else "") for n in names})
            raise SpecError(f"{prefix!r} names no parameter of the model; its parameters start with "
                            f"{', '.join(tops[:8])}", f"init_from.freeze.{i}")
        frozen |= matched
    if init.train_last is not None:
        from raybig.models.parts import NoParts, model_parts

        try:
            parts = model_parts(model, blocks_name)
        except NoParts as err:
            raise SpecError(f"the model has no parts to count: {err}; use init_from.freeze",
                            "init_from.train_last") from None
        if init.train_last >= len(parts):
            raise SpecError(f"the model has {len(parts)} parts: train_last {init.train_last} would freeze none",
                            "init_from.train_last")
        ids = {id(p) for part in parts[:-init.train_last] for m in part.modules.values() for p in m.parameters()}
        frozen |= {name for name, p in model.named_parameters() if id(p) in ids}
    return frozen


def check_init(model: nn.Module, spec) -> str:
    """The driver's check before any worker starts; returns what loading will do, for the user."""
    fit = weight_fit(model, weights_file(spec.init_from.source))
    frozen = frozen_names(model, spec.init_from, getattr(spec.model, "blocks", None))
    trained = sum(1 for name, _ in model.named_parameters() if name not in frozen)
    if trained == 0:
        raise SpecError("every parameter would be frozen: nothing would train", "init_from.freeze")
    return fit.summary() + (f"; {len(frozen)} parameters frozen" if frozen else "")


def start_from(model: nn.Module, spec, resuming: bool) -> set[str]:
    """Load the source's fitting weights into `model` (not when resuming: the checkpoint has them), freeze
    what the spec says; returns the names of the parameters that came from the source."""
    init = spec.init_from
    file = weights_file(init.source)
    fit = weight_fit(model, file)
    if not resuming:
        state = load_file(str(file))
        model.load_state_dict({k: state[k] for k in fit.loaded}, strict=False)
    frozen = frozen_names(model, init, getattr(spec.model, "blocks", None))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return set(fit.loaded)


def parameter_groups(modules: list[nn.Module], pretrained: set[str], lr_scale: float) -> list[dict]:
    """The trained parameters of this rank's modules, the pretrained ones in a group of their own at
    `lr_scale` of the learning rate (raybig.train.optim reads "lr_scale")."""
    groups = {True: [], False: []}
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                groups[name in pretrained].append(param)
    out = [{"params": params, "lr_scale": scale} for params, scale in
           ((groups[True], lr_scale), (groups[False], 1.0)) if params]
    return out or [{"params": [], "lr_scale": 1.0}]  # a pipeline stage frozen whole trains nothing


def zero_masks(modules: list[nn.Module], pretrained: set[str]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """For init_from.keep_zeros: each loaded, trained weight that has zeros, with where it is not zero."""
    out = []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad and name in pretrained and bool((param == 0).any()):
                out.append((param, (param != 0).to(param.dtype)))
    return out


@torch.no_grad()
def keep_zeros(masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, mask in masks:
        param.mul_(mask)
