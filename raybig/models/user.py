"""A model of the user's own: `model: {kind: python, factory: "pkg.module:build", args: {...}}`.

The factory is called as `factory(meta, **args)` (meta: the data's DataMeta: .task, .shape, .num_classes,
.vocab) and returns an nn.Module whose forward takes a batch of inputs and returns logits. Its code is
imported from `model.code` (directories put first on the import path; by default the spec's own
directory) by every process that builds the model: the driver (to check it before anything starts), each
rank, and a server only when told to trust it (`raybig serve --trust-code`).
"""
from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from raybig.errors import SpecError
from raybig.models.parts import probe_batch


class UntrustedCode(RuntimeError):
    """A run whose model is user code was to be loaded without the caller's consent to run that code."""


def import_factory(factory: str, code: list[str]):
    """The callable `factory` names ("pkg.module:attr"), imported with the `code` directories first on the path."""
    for directory in reversed(code):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    module_name, _, attr = factory.partition(":")
    where = f" (looked in {', '.join(code)} and the installed packages)" if code else ""
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while it is imported
        raise SpecError(f"{factory}: cannot import {module_name}{where}: {type(err).__name__}: {err}",
                        "model.factory") from None
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise SpecError(f"{factory}: {module_name} has no attribute {attr}", "model.factory")
    if not callable(target):
        raise SpecError(f"{factory}: {attr} is a {type(target).__name__}, not a callable", "model.factory")
    return target


def build_user_model(model_spec, meta) -> nn.Module:
    factory = import_factory(model_spec.factory, model_spec.code)
    try:
        model = factory(meta, **model_spec.args)
    except Exception as err:
        raise SpecError(f"{model_spec.factory}(meta, **model.args) raised {type(err).__name__}: {err}",
                        "model.factory") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"{model_spec.factory} returned a {type(model).__name__}, not a torch.nn.Module",
                        "model.factory")
    if not any(p.requires_grad for p in model.parameters()):
        raise SpecError(f"{model_spec.factory} returned a module with no trainable parameters", "model.factory")
    return model


def check_output(model: nn.Module, model_spec, meta) -> None:
    """Run the module on a probe batch of two samples: its logits must have the data's classes (or the
    vocabulary) as their last dimension, so the loss and metrics apply."""
    probe = probe_batch(meta)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as err:
        raise SpecError(f"{model_spec.factory}: the module's forward failed on a batch of shape "
                        f"{list(probe.shape)} ({probe.dtype}): {type(err).__name__}: {err}", "model.factory") from None
    want = [2, *meta.shape, meta.num_classes] if meta.task == "lm" else [2, meta.num_classes]
    if not isinstance(out, torch.Tensor) or list(out.shape) != want:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"{model_spec.factory}: the module returned {got} for a batch of shape {list(probe.shape)}; "
                        f"expected logits of shape {want}", "model.factory")
