"""The one training loop. It runs on every rank of every layout; what differs between layouts is
applied from outside (`parallelize`) and the batch source it is handed, never the loop itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raybig.models import build_model
from raybig.train.checkpoint import RunStore
from raybig.train.metrics import confusion, from_confusion
from raybig.train.optim import build_optimizer, build_scheduler, penalized_weights, regularization_penalty
from raybig.train.parallel import parallelize, unwrap


@dataclass
class WorkerEnv:
    """What a rank knows about its place in the run."""
    rank: int
    world: int
    device: torch.device
    train: object  # a MemorySource or StreamSource
    val: object
    report: Callable[[dict], None] = lambda metrics: None  # every rank, once per epoch
    progress: Callable[[dict], None] | None = None  # rank 0 only: live updates for the driver

    @property
    def distributed(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()


def loss_fn(spec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    classes = outputs.shape[-1]
    logits = outputs.reshape(-1, classes).float()
    targets = targets.reshape(-1)
    if spec.train.loss == "mse":
        return F.mse_loss(logits, F.one_hot(targets, classes).float())
    return F.cross_entropy(logits, targets)


def _sum_across_ranks(tensor: torch.Tensor, env: WorkerEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor)
    return tensor


def evaluate(spec, model, env: WorkerEnv, classes: int) -> dict[str, float]:
    model.eval()
    cm = torch.zeros(classes, classes, dtype=torch.long)
    loss_sum, count = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    with torch.no_grad(), _autocast(spec, env.device):
        for x, y in env.val.eval_batches():
            x, y = x.to(env.device), y.to(env.device)
            out = model(x)
            n = y.numel()
            loss_sum += float(loss_fn(spec, out, y)) * n
            count += n
            cm += confusion(out.argmax(-1).cpu(), y.cpu(), classes)
    totals = _sum_across_ranks(torch.cat([loss_sum, count, cm.reshape(-1).double()]), env)
    metrics = from_confusion(totals[2:].reshape(classes, classes))
    return {"val_loss": float(totals[0] / totals[1].clamp(min=1)), **{f"val_{k}": v for k, v in metrics.items()}}


def _autocast(spec, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.train.precision == "bf16")


def fit(spec, meta, env: WorkerEnv, store: RunStore) -> list[dict]:
    """Train from the newest checkpoint in `store` (or from scratch) to spec.train.epochs."""
    t = spec.train
    model = build_model(spec.model, meta, dropout=t.regularization.dropout, seed=t.seed).to(env.device)
    optimizer = build_optimizer(model.parameters(), t.optimizer)
    steps_per_epoch = env.train.steps_per_epoch
    scheduler = build_scheduler(optimizer, t.lr_schedule, steps_per_epoch, t.epochs)
    history: list[dict] = []
    start_epoch, step = 0, 0
    latest = store.latest()
    if latest is not None:
        model_state, trainer_state, ckpt_meta = RunStore.load_checkpoint(latest)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_epoch, step, history = ckpt_meta["epoch"], ckpt_meta["step"], ckpt_meta["history"]
    model = parallelize(model, env)
    weights = penalized_weights(unwrap(model))
    reg = t.regularization
    attempt = time.strftime("%Y-%m-%dT%H:%M:%S")
    classes = meta.num_classes

    for epoch in range(start_epoch + 1, t.epochs + 1):
        model.train()
        torch.manual_seed(t.seed * 7919 + epoch * 131 + env.rank)  # dropout masks: reproducible, distinct per rank
        step_losses = torch.zeros(steps_per_epoch, dtype=torch.float64)
        started = time.perf_counter()
        for i, (x, y) in enumerate(env.train.train_batches(epoch)):
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with _autocast(spec, env.device):
                data_loss = loss_fn(spec, model(x), y)
            loss = data_loss + regularization_penalty(weights, reg.l1, reg.l2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            step_losses[i] = data_loss.detach().float()
            if env.progress and (i % 10 == 0 or i == steps_per_epoch - 1):
                env.progress({"type": "step", "epoch": epoch, "step": i + 1, "steps": steps_per_epoch,
                              "loss": float(data_loss)})
        train_seconds = time.perf_counter() - started
        step_losses = _sum_across_ranks(step_losses, env) / env.world  # the global batch's mean loss per step
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(step_losses.mean()),
            **evaluate(spec, unwrap(model), env, classes),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": steps_per_epoch * t.batch_size / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            "attempt": attempt,
            "step_losses": step_losses.tolist(),
        }
        history.append(record)
        if env.rank == 0:
            _save(spec, meta, store, unwrap(model), optimizer, scheduler, record, history, env)
        env.report({k: v for k, v in record.items() if k != "step_losses"})
    return history


def _save(spec, meta, store: RunStore, model, optimizer, scheduler, record, history, env) -> None:
    """Rank 0 writes: an epoch checkpoint on the cadence (and at the end), always the metrics and current model."""
    epoch, last = record["epoch"], record["epoch"] == spec.train.epochs
    state = model.state_dict()
    if epoch % spec.checkpoint.every_epochs == 0 or last:
        store.save_checkpoint(
            epoch, state, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            {"epoch": epoch, "step": record["step"], "history": history}, keep=spec.checkpoint.keep)
        store.publish_model(state, {"name": spec.name, "kind": spec.model.kind, "epoch": epoch,
                                    "data": meta.to_dict(), "model": spec.model.model_dump(mode="json"),
                                    "metrics": {k: v for k, v in record.items() if k != "step_losses"}})
    store.write_history(history)
    if env.progress:
        env.progress({"type": "epoch", **record})
