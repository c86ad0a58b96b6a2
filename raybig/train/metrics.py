"""Classification metrics from a confusion matrix, which sums across ranks with one all-reduce."""
from __future__ import annotations

import torch


def confusion(preds: torch.Tensor, targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Rows are true classes, columns predictions."""
    idx = targets.reshape(-1).long() * classes + preds.reshape(-1).long()
    return torch.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def from_confusion(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy, and precision, recall and F1 macro-averaged over the classes that occur (as sklearn does)."""
    cm = cm.double()
    tp = cm.diag()
    true, pred = cm.sum(1), cm.sum(0)
    present = (true + pred) > 0
    precision = torch.where(pred > 0, tp / pred.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true > 0, tp / true.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    total = cm.sum().clamp(min=1)
    return {
        "accuracy": float(tp.sum() / total),
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
    }
