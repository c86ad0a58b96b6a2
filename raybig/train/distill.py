"""Knowledge distillation (the spec's distill section): the model trains on a weighted sum of its usual loss on
the labels and the KL divergence of its softened outputs from a trained teacher's, as Hinton et al. (2015):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * loss(student, labels)

The teacher runs in inference mode on each rank that computes the loss, on the same batch. Its logits travel
with the labels as the targets (column 0 the label, then one column per class), so every layout hands them to
the loss as it hands labels, split into the same microbatches by a pipeline schedule.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from raybig.data.documents import IGNORE
from raybig.errors import SpecError

FIELD = "distill.teacher"


def teacher_info(spec) -> dict:
    """The teacher run's model.json, checked against the student's data on the driver (SpecError naming the
    field)."""
    path = Path(spec.distill.teacher)
    info_file = path / "model.json"
    if not info_file.is_file() or not (path / "model.safetensors").is_file():
        raise SpecError(f"{path} holds no trained model (model.json and model.safetensors)", FIELD)
    info = json.loads(info_file.read_text())
    if info["model"].get("kind") == "python" and not spec.distill.trust_code:
        raise SpecError(f"the teacher is a python model ({info['model'].get('factory')}): loading it runs that "
                        "code; set distill.trust_code: true if you trust it", FIELD)
    return info


def check_teacher(spec, meta) -> str:
    info = teacher_info(spec)
    theirs = info["data"]
    if theirs.get("task") != meta.task or theirs.get("num_classes") != meta.num_classes or \
            list(theirs.get("shape", [])) != list(meta.shape) or theirs.get("vocab", "") != meta.vocab:
        raise SpecError(f"the teacher was trained on other data ({theirs.get('task')}, shape {theirs.get('shape')}, "
                        f"{theirs.get('num_classes')} outputs); this run's data is {meta.task}, shape {meta.shape}, "
                        f"{meta.num_classes} outputs", FIELD)
    if meta.tokenizer and theirs.get("tokenizer") != meta.tokenizer:
        raise SpecError("the teacher was trained with another tokenizer than this data gives", FIELD)
    return f"teacher {info.get('name') or Path(spec.distill.teacher).name} ({info['model'].get('kind')})"


class Teacher:
    """The trained teacher on this rank's device, in inference mode."""

    def __init__(self, spec, device: torch.device):
        from raybig.train.checkpoint import load_trained_model

        model, _ = load_trained_model(spec.distill.teacher, trust_code=spec.distill.trust_code)
        self.model = model.to(device).requires_grad_(False)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The labels with the teacher's logits beside them, as one float tensor."""
        logits = self.model(x).float()
        return torch.cat([y.unsqueeze(-1).float(), logits], dim=-1)


def distilling(criterion, temperature: float, alpha: float):
    """`criterion` (the loss on labels) extended to targets that carry a teacher's logits; plain integer labels
    (evaluation) get `criterion` alone."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not targets.is_floating_point():
            return criterion(outputs, targets)
        labels, teacher = targets[..., 0].long(), targets[..., 1:]
        classes = outputs.shape[-1]
        student = F.log_softmax(outputs.reshape(-1, classes).float() / temperature, dim=-1)
        soft_targets = F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1)
        kl = F.kl_div(student, soft_targets, log_target=True, reduction="none").sum(-1)
        counted = (labels.reshape(-1) != IGNORE).float()  # a language model's prompt tokens are not taught
        soft = (kl * counted).sum() / counted.sum().clamp(min=1) * temperature ** 2
        return alpha * soft + (1 - alpha) * criterion(outputs, labels)

    return loss
