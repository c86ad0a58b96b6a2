"""The one training loop. It runs on every rank of every layout; what differs between layouts is
applied from outside (`parallelize`) and the batch source it is handed, never the loop itself.
"""
from __future__ import annotations

import itertools
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raybig.data.chat import DEFAULT_CHAT_TEMPLATE
from raybig.data.documents import IGNORE
from raybig.models import build_model
from raybig.train.checkpoint import OPTIMIZER_SHARDS, RunStore
from raybig.train.distill import Teacher, distilling
from raybig.train.finetune import keep_zeros, parameter_groups, start_from, zero_masks
from raybig.train.metrics import confusion, from_confusion
from raybig.train.optim import (add_penalty_gradients, apply_spec_hyperparameters, build_optimizer, build_scheduler,
                                penalized_weights)
from raybig.train.parallel import (clip_grad_norm, load_optimizer_state, load_sharded_optimizer_state, load_state,
                                   local_numel, parallelize, parameters, sharded_optimizer_state, state_dict)
from raybig.train.precision import Precision


@dataclass
class WorkerEnv:
    """What a rank knows about its place in the run."""
    rank: int
    world: int
    device: torch.device
    train: object  # a MemorySource or StreamSource
    val: object
    progress: Callable[[dict], None] | None = None  # rank 0 only: live updates for the driver
    # False in a sweep trial: epochs can finish faster than the trial hands their checkpoints to Tune, so the
    # trial prunes them itself once copied (raybig.sweep.trial)
    prune_checkpoints: bool = True
    attempt: str = ""  # which start of the worker group this is, recorded with every epoch it trains
    # a sweep trial: the epochs where its scheduler may stop it, and (rank 0) how to ask the trial whether
    # it goes on; `stop` set ends a rank running on the trial's own thread at the next step
    gate_epochs: frozenset = frozenset()
    word: Callable[[int], bool] | None = None
    stop: object | None = None  # a threading.Event

    @property
    def distributed(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()


def loss_fn(spec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if spec.data.is_regression:
        return F.mse_loss(outputs.reshape(-1).float(), targets.reshape(-1).float())
    classes = outputs.shape[-1]
    logits = outputs.reshape(-1, classes).float()
    targets = targets.reshape(-1)
    if spec.train.loss == "mse":
        return F.mse_loss(logits, F.one_hot(targets, classes).float())
    # the mean over the targets the loss is on, and 0 (not NaN) for a window of prompt tokens only
    return F.cross_entropy(logits, targets, reduction="sum") / (targets != IGNORE).sum().clamp(min=1)


def _sum_across_ranks(tensor: torch.Tensor, env: WorkerEnv) -> torch.Tensor:
    """Summed over every rank, where `tensor` is (NCCL reduces on the GPU: a CPU tensor goes there and back)."""
    if env.distributed:
        on_device = tensor.to(env.device)
        dist.all_reduce(on_device)
        return on_device.to(tensor.device)
    return tensor


def evaluate(spec, layout, env: WorkerEnv, meta, criterion) -> dict[str, float]:
    """Validation loss and metrics, computed where the model's output is and summed over all ranks: a
    classifier's from its confusion matrix; a language model's per token (a vocabulary-sized confusion
    matrix would not fit), over the targets the loss is on."""
    for module in layout.local:
        module.eval()
    if meta.task == "regression":
        return _evaluate_regression(spec, layout, env, criterion)
    lm, classes = meta.task == "lm", meta.num_classes
    cm = torch.zeros(0 if lm else classes * classes, dtype=torch.long)
    loss_sum, count, correct = (torch.zeros(1, dtype=torch.float64) for _ in range(3))
    for x, y in _val_batches(spec, layout, env):
        x, y = x.to(env.device), y.to(env.device)
        out = layout.forward(x, y)
        if out is None or len(y) == 0 or not layout.reports:
            continue
        counted = y != IGNORE
        n = int(counted.sum())
        if n == 0:
            continue
        loss_sum += float(criterion(out, y)) * n
        count += n
        preds = out.argmax(-1)
        if lm:
            correct += int((preds == y)[counted].sum())
        else:
            cm += confusion(preds.cpu(), y.cpu(), classes).reshape(-1)
    totals = _sum_across_ranks(torch.cat([loss_sum, count, correct, cm.double()]), env)
    val_loss = float(totals[0] / totals[1].clamp(min=1))
    if lm:
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0)),
                "val_token_accuracy": float(totals[2] / totals[1].clamp(min=1))}
    metrics = from_confusion(totals[3:].reshape(classes, classes))
    return {"val_loss": val_loss, **{f"val_{k}": v for k, v in metrics.items()}}


def _evaluate_regression(spec, layout, env: WorkerEnv, criterion) -> dict[str, float]:
    """Mean squared and absolute errors over the validation rows (val_loss: the training loss, mse)."""
    sums = torch.zeros(3, dtype=torch.float64)  # squared errors, absolute errors, rows
    for x, y in _val_batches(spec, layout, env):
        out = layout.forward(x.to(env.device), y.to(env.device))
        if out is None or len(y) == 0 or not layout.reports:
            continue
        error = out.reshape(-1).double().cpu() - y.reshape(-1).double()
        sums += torch.stack([error.pow(2).sum(), error.abs().sum(), torch.tensor(float(len(error)), dtype=torch.float64)])
    sums = _sum_across_ranks(sums, env)
    mse, mae = (float(v) for v in sums[:2] / sums[2].clamp(min=1))
    return {"val_loss": mse, "val_mse": mse, "val_mae": mae}


def _val_batches(spec, layout, env: WorkerEnv):
    """The validation batches this rank evaluates: eval.max_batches of them at most."""
    return _in_step(itertools.islice(env.val.eval_batches(), spec.eval.max_batches), layout, env)


def _in_step(batches, layout, env: WorkerEnv):
    """A sharded model's forward is a collective: every rank must run as many as the others, so a rank whose
    share of the validation rows makes fewer batches runs empty ones."""
    if not getattr(layout, "collective_forward", False) or not env.distributed:
        yield from batches
        return
    batches = list(batches)
    most = torch.tensor([len(batches)], device=env.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    yield from batches
    x, y = (batches[0] if batches else (torch.zeros(0), torch.zeros(0, dtype=torch.long)))
    for _ in range(int(most) - len(batches)):
        yield x[:0], y[:0]


@dataclass
class StepPlan:
    """When a run stops, records its metrics and checkpoints, counted in optimizer steps."""
    steps_per_epoch: int
    total: int  # train.max_steps, or every step of train.epochs
    record_every: int | None  # eval.every_steps; None: at each epoch's end
    checkpoint_every: int | None  # checkpoint.every_steps; None: every checkpoint.every_epochs epochs
    checkpoint_epochs: int

    @classmethod
    def of(cls, spec, steps_per_epoch: int) -> "StepPlan":
        total = spec.train.max_steps or spec.train.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, spec.eval.every_steps, spec.checkpoint.every_steps,
                   spec.checkpoint.every_epochs)

    def records_at(self, step: int, epoch_end: bool) -> bool:
        due = step % self.record_every == 0 if self.record_every else epoch_end
        return due or step == self.total

    def checkpoints_at(self, step: int, epoch: int, epoch_end: bool) -> bool:
        due = step % self.checkpoint_every == 0 if self.checkpoint_every else \
            epoch_end and epoch % self.checkpoint_epochs == 0
        return due or step == self.total


def fit(spec, meta, env: WorkerEnv, store: RunStore) -> list[dict]:
    """Train from the newest checkpoint in `store` (or from scratch) to train.max_steps or train.epochs. A
    checkpoint taken mid-epoch resumes at the very next batch, with the step losses not yet recorded."""
    t, reg = spec.train, spec.train.regularization
    # Every rank builds the whole model from the same seed and keeps its part: identical initial
    # weights in every layout, which is what lets a pipeline run reproduce a single-process one. It is built
    # in host memory: the layout moves only this rank's stage, shard or slice to the device.
    model = build_model(spec.model, meta, dropout=reg.dropout, seed=t.seed)
    latest = store.latest()
    # fine-tuning: the source's weights (a fresh start only), frozen parts; before the model is split or wrapped
    pretrained = start_from(model, spec, resuming=latest is not None) if spec.init_from else set()
    criterion = getattr(model, "loss", None) or (lambda out, y: loss_fn(spec, out, y))  # the model's own, if any
    d = spec.distill
    training_loss = distilling(criterion, d.temperature, d.alpha) if d else criterion
    precision = Precision(t.precision, env.device)
    layout = parallelize(model, spec, env, training_loss, precision)
    teacher = Teacher(spec, env.device) if d and layout.holds_output else None  # where the loss is computed
    params = parameters(layout)
    optimizer = build_optimizer(parameter_groups(layout.local, pretrained, spec.init_from.pretrained_lr_scale)
                                if spec.init_from else params, t.optimizer)
    plan = StepPlan.of(spec, env.train.steps_per_epoch)
    scheduler = build_scheduler(optimizer, t.lr_schedule, plan.steps_per_epoch, plan.total)
    history: list[dict] = []
    epochs_done, batches_done, step, carried = 0, 0, 0, []
    if latest is not None:
        model_state, trainer_state, ckpt_meta = RunStore.load_checkpoint(latest, part=layout.mesh.pp_index)
        load_state(layout, model_state)
        same_optimizer = ckpt_meta.get("optimizer", t.optimizer.name) == t.optimizer.name
        if trainer_state is not None and ckpt_meta.get("layout") == _layout_key(spec) and same_optimizer:
            if trainer_state["optimizer"] is None:  # written as shards
                load_sharded_optimizer_state(layout, optimizer, latest / OPTIMIZER_SHARDS)
            else:
                load_optimizer_state(layout, optimizer, trainer_state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
            if "precision" in trainer_state:
                precision.load_state_dict(trainer_state["precision"])
        else:  # weights are layout-free; optimizer state is per stage (and per optimizer): start it afresh
            scheduler.last_epoch = ckpt_meta["step"]
        apply_spec_hyperparameters(optimizer, scheduler, t.optimizer)
        epochs_done, step, history = ckpt_meta["epoch"], ckpt_meta["step"], ckpt_meta["history"]
        batches_done, carried = ckpt_meta.get("batch", 0), ckpt_meta.get("unrecorded_losses", [])
    weights = [w for module in layout.local for w in penalized_weights(module)]
    masks = zero_masks(layout.local, pretrained) if spec.init_from and spec.init_from.keep_zeros else []
    attempt = env.attempt or time.strftime("%Y-%m-%dT%H:%M:%S")
    if env.progress:  # set-up is done: where a run's fixed cost ends (raybig.phases)
        env.progress({"type": "ready", "at": time.time(), "pid": os.getpid()})
    losses = StepLosses(carried)
    zero = torch.zeros((), dtype=torch.float64, device=env.device)
    epoch = epochs_done
    started = time.perf_counter()
    while step < plan.total:
        epoch += 1
        first = batches_done if epoch == epochs_done + 1 else 0
        _train_mode(layout)
        for i, (x, y) in enumerate(env.train.train_batches(epoch, start=first), start=first):
            if env.stop is not None and env.stop.is_set():  # its trial is over (one rank: no peer waits)
                return history
            # dropout masks: reproducible per step (so a resumed run draws the same), distinct per rank but the
            # same across a tensor-parallel group, whose ranks hold the same activations
            torch.manual_seed(t.seed * 7919 + step * 131 + env.rank // spec.parallelism.tensor)
            if env.device.type == "cuda":  # a copy from pinned memory overlaps the step before it
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if teacher is not None:
                y = teacher.targets(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss = layout.train_step(x, y)
            if precision.unscale(params):  # False: fp16 gradients overflowed, and the step is skipped
                add_penalty_gradients(weights, reg.l1, reg.l2)
                if t.grad_clip:
                    clip_grad_norm(layout, t.grad_clip)
                optimizer.step()
                keep_zeros(masks)
            scheduler.step()
            step += 1
            losses.new.append(loss.detach().double() if loss is not None and layout.reports else zero)
            epoch_end = i == plan.steps_per_epoch - 1
            if env.progress and (i % 10 == 0 or epoch_end):
                env.progress({"type": "step", "epoch": epoch, "step": i + 1, "steps": plan.steps_per_epoch,
                              "global_step": step, "total_steps": plan.total,
                              "loss": float(loss) if loss is not None else float("nan"), "at": time.time()})
            record = None
            if plan.records_at(step, epoch_end):
                record = _record(spec, meta, layout, env, criterion, scheduler, epoch, step, losses, started,
                                 attempt, params, history)
                history.append(record)
                losses = StepLosses()
                _train_mode(layout)  # evaluation left it in eval mode (dropout off)
            if plan.checkpoints_at(step, epoch, epoch_end):
                position = (epoch, 0) if epoch_end else (epoch - 1, i + 1)
                newest = record or (history[-1] if history else None)
                _checkpoint(spec, meta, store, layout, {"optimizer": optimizer, "scheduler": scheduler,
                            "precision": precision}, position, step, newest, history, losses, env,
                            last=step == plan.total)
            if record is not None:
                _report(record, history, store, env)
                started = time.perf_counter()
            if step == plan.total:
                break
        if epoch in env.gate_epochs and step < plan.total and not _trial_goes_on(epoch, env):
            break
    return history


class StepLosses:
    """The losses of the steps since the last record: those a resumed run carries from its checkpoint (already
    averaged over the replicas), and this run's, kept on the device (writing one needs no host sync)."""

    def __init__(self, carried: list[float] = ()):
        self.carried, self.new = list(carried), []

    def averaged(self, env: WorkerEnv, replicas: int) -> list[float]:
        """Every step's loss averaged over the data-parallel replicas (a collective: every rank calls it).
        Only the ranks holding the model's output have a loss, one per replica."""
        new = (_sum_across_ranks(torch.stack(self.new), env) / replicas).tolist() if self.new else []
        return self.carried + new


def _train_mode(layout) -> None:
    for module in layout.local:
        module.train()


def _record(spec, meta, layout, env, criterion, scheduler, epoch, step, losses, started, attempt, params,
            history) -> dict:
    """The metrics of the steps since the last record, and of the validation data now."""
    if env.device.type == "cuda":  # kernels run ahead of the host: time the work, not its launch
        torch.cuda.synchronize(env.device)
    train_seconds = time.perf_counter() - started
    # only the ranks holding the model's output have a loss: one per data-parallel replica
    step_losses = torch.tensor(losses.averaged(env, spec.parallelism.data), dtype=torch.float64)
    steps = len(step_losses)
    record = {
        "epoch": epoch,
        "step": step,
        "train_loss": float(step_losses.mean()),
        **evaluate(spec, layout, env, meta, criterion),
        "lr": scheduler.get_last_lr()[0],
        "samples_per_s": steps * spec.train.batch_size / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "attempt": attempt,
        "step_losses": step_losses.tolist(),
    }
    if meta.task == "lm":
        record["tokens_per_s"] = record["samples_per_s"] * meta.shape[0]
    if meta.skipped_rows:
        record["skipped_rows"] = meta.skipped_rows
    _stop_if_diverged(record, history, spec.train.divergence_factor)
    # what each rank really needs: its peak memory (MB), and the parameters it holds (a stage, a shard)
    record["peak_rss_mb"] = _per_rank(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, env)
    record["parameters_per_rank"] = _per_rank(sum(local_numel(p) for p in params), env)
    if env.device.type == "cuda":
        record["peak_device_mb"] = _per_rank(torch.cuda.max_memory_allocated(env.device) / 2**20, env)
    record["epoch_seconds"] = time.perf_counter() - started  # since the last record, evaluation included
    return record


def _trial_goes_on(epoch: int, env: WorkerEnv) -> bool:
    """A sweep trial at an epoch where its scheduler may stop it: rank 0 waits for the trial's word and every
    rank takes it from rank 0, so all stop at the same epoch (a rank that went on would wait for its peers
    for good), and stopped there, the ranks are fit for the next trial."""
    go = torch.tensor([int(env.word(epoch)) if env.word is not None else 1])
    if env.distributed:
        flag = go.to(env.device)
        dist.broadcast(flag, 0)
        go = flag.cpu()
    return bool(go.item())


def _stop_if_diverged(record: dict, history: list[dict], factor: float | None) -> None:
    """A NaN or infinite loss, or one that rose far above where the run started: training cannot recover, and
    a sweep should record the trial as diverged rather than spend epochs on it."""
    loss, epoch = record["train_loss"], record["epoch"]
    hint = "the run diverged (a lower train.optimizer.lr may help)"
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss} at epoch {epoch}: {hint}")
    first = (history[0] if history else record)["step_losses"][0]
    if factor and math.isfinite(first) and first > 0 and loss > factor * first:
        raise FloatingPointError(f"the training loss rose to {loss:.3g} at epoch {epoch}, over "
                                 f"train.divergence_factor {factor:g} x its first step's {first:.3g}: {hint}")


def _per_rank(value: float, env: WorkerEnv) -> list[float]:
    """`value` from every rank, in rank order."""
    mine = torch.tensor([value], dtype=torch.float64)
    if not env.distributed:
        return mine.tolist()
    if dist.get_backend() == "nccl":
        mine = mine.to(env.device)
    every = [torch.zeros_like(mine) for _ in range(env.world)]
    dist.all_gather(every, mine)
    return torch.cat(every).tolist()


def _layout_key(spec) -> list:
    """What the optimizer's checkpointed state depends on: stages, and sharding (its shards keyed by name)."""
    p = spec.parallelism.pipeline
    key = [p.stages, p.total_stages, p.split_points]
    key += ["fsdp"] if spec.parallelism.data_mode == "fsdp" and spec.parallelism.data > 1 else []
    return key + [f"tensor {spec.parallelism.tensor}"] if spec.parallelism.tensor > 1 else key


def _barrier(env: WorkerEnv) -> None:
    if env.distributed:
        dist.barrier()


def _checkpoint(spec, meta, store: RunStore, layout, trainer: dict, position, step, record, history,
                losses, env, last: bool) -> None:
    """Each pipeline rank of the first data-parallel replica writes its part of a checkpoint; rank 0 then
    merges the parts into one full model and renames the checkpoint into place. `position` is (whole epochs,
    batches of the next one); the step losses not yet recorded go with it, so a resumed run records them."""
    epochs, batch = position
    pending = store.pending_checkpoint(epochs, batch)
    if env.rank == 0:
        store.clear(pending)
    _barrier(env)
    if layout.sharded:  # every rank writes its shards (a collective): nothing is gathered
        store.write_shards(pending, state_dict(layout), sharded_optimizer_state(layout, trainer["optimizer"]))
        state = optimizer_state = None  # in the shards
    else:
        state, optimizer_state = state_dict(layout), trainer["optimizer"].state_dict()
    unrecorded = losses.averaged(env, spec.parallelism.data)
    if layout.writes_part:
        store.write_part(pending, layout.mesh.pp_index, state,
                         {"optimizer": optimizer_state, "scheduler": trainer["scheduler"].state_dict(),
                          "precision": trainer["precision"].state_dict()})
    _barrier(env)
    if env.rank != 0:
        return
    info = {"name": spec.name, "kind": spec.model.kind, "epoch": epochs, "step": step, "data": meta.to_dict(),
            "model": spec.model.model_dump(mode="json"),
            "metrics": {k: v for k, v in (record or {}).items() if k != "step_losses"}}
    parents = {"init_from": spec.init_from.source if spec.init_from else None,
               "teacher": spec.distill.teacher if spec.distill else None}
    if any(parents.values()):  # what `raybig lineage` follows
        info["lineage"] = {k: v for k, v in parents.items() if v}
    if meta.task == "lm":
        info["chat_template"] = meta.chat_template or DEFAULT_CHAT_TEMPLATE
    if spec.model.kind == "hf":
        from raybig.models.hf import hf_config

        info["hf_config"] = hf_config(spec.model, meta).to_dict()
    publish = None
    if getattr(spec.model, "lora", None):  # checkpoints hold the adapters; the merged model is served
        from raybig.models.lora import merged_state

        publish = merged_state(layout.local[0])
    store.finish_checkpoint(pending, {"epoch": epochs, "batch": batch, "step": step, "history": history,
                                      "unrecorded_losses": unrecorded, "layout": _layout_key(spec),
                                      "optimizer": spec.train.optimizer.name, "run": spec.name}, info,
                            keep=spec.checkpoint.keep if env.prune_checkpoints else None, publish=publish)
    if last and spec.model.kind == "hf":
        from raybig.models.hf import write_pretrained

        write_pretrained(store.root / "hf", spec.model, meta, store.root / "model.safetensors")
        store.saved("hf")  # an object-store run uploads it


def _report(record, history, store: RunStore, env) -> None:
    """A new record: into metrics.json, and to the driver's progress view (or the sweep trial)."""
    if env.rank == 0:
        store.write_history(history)
        if env.progress:
            env.progress({"type": "epoch", **record})
