"""What a sweep leaves in the model store, and the best trial registered as a normal run.

    runs/<name>/                 the best trial's model, a normal run: `raybig serve runs/<name>` takes it
      spec.yaml, model.safetensors, model.json, metrics.json, curves.png, checkpoints/
      sweep/
        results.parquet, results.csv   one row per trial: config, status, reason, epochs, metrics
        best.json                      the best trial: id, config, metric
        plots/<metric>_per_epoch.png   the metric of every trial over its epochs
        plots/<metric>_vs_<path>.png   the metric against each hyperparameter
        trials/<trial id>/             each trial's own run
        tune/                          Ray Tune's experiment state (what --resume continues)
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import yaml

from raybig.train.checkpoint import RunStore


def trial_rows(grid, spec, sweep_dir: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per trial, and each trial's reported epochs, from Ray Tune's ResultGrid."""
    sweep = spec.sweep
    rows, histories = [], {}
    for result in grid:
        trial_id = Path(result.path).name
        trial_root = sweep_dir / "trials" / f"{spec.name}-{trial_id}"
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        history = [] if frame is None else frame.to_dict("records")
        histories[trial_id] = [h for h in history if "epoch" in h and not _missing(h.get("epoch"))]
        epochs = int(metrics["epoch"]) if not _missing(metrics.get("epoch")) else 0
        if result.error is not None:
            reason = _reason(result.error)
            status = "diverged" if "diverged" in reason else "failed"
        else:
            stopper = sweep.scheduler.name if sweep.scheduler.name != "fifo" else "the time budget"
            reason = "" if epochs >= spec.train.epochs else f"stopped early by {stopper}"
            status = "completed" if epochs >= spec.train.epochs else "stopped"
        values = [h[sweep.metric] for h in histories[trial_id] if not _missing(h.get(sweep.metric))]
        best = (max if sweep.goal == "max" else min)(values) if values else float("nan")
        rows.append({
            "trial": trial_id, "status": status, "reason": reason, "epochs": epochs,
            sweep.metric: float(metrics.get(sweep.metric, float("nan"))), f"best_{sweep.metric}": best,
            **{k: float(metrics.get(k, float("nan"))) for k in ("val_accuracy", "val_loss", "train_loss")
               if k != sweep.metric},
            "seconds": float(metrics.get("time_total_s", float("nan"))),
            **_config_of(result, trial_root, sweep.space),
            "restored_from": _restored_from(trial_root),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else "",
        })
    rows.sort(key=lambda r: r["trial"])
    return rows, histories


def _config_of(result, trial_root: Path, space: dict) -> dict:
    """The trial's sampled values; a trial interrupted before its first report has them only in its run's spec."""
    if result.config:
        return {path: _plain(result.config.get(path)) for path in space}
    stored = yaml.safe_load((trial_root / "spec.yaml").read_text()) if (trial_root / "spec.yaml").is_file() else {}
    out = {}
    for path in space:
        node = stored
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        out[path] = node
    return out


def _restored_from(trial_root: Path) -> str:
    """'<run>@<epoch>' when the trial last continued from a checkpoint (PBT, or --resume), else ''."""
    path = trial_root / "restored.json"
    if not path.is_file():
        return ""
    restored = json.loads(path.read_text())
    return f"{restored['run']}@{restored['epoch']}"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _reason(error: BaseException) -> str:
    """The trial's own error, not Ray's wrapping of it (nor the hint where the worker logs are)."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("worker logs:")]
    if not lines:
        return type(error).__name__
    return re.sub(r"^[\w.]*\.RunFailed: ", "", lines[-1])[:300]


def best_row(rows: list[dict], spec) -> dict | None:
    """The best trial by the metric of its last reported epoch: that epoch's model is the one registered."""
    metric, goal = spec.sweep.metric, spec.sweep.goal
    usable = [r for r in rows if r["status"] in ("completed", "stopped") and not _missing(r[metric])]
    if not usable:
        return None
    return (max if goal == "max" else min)(usable, key=lambda r: r[metric])


def write_table(rows: list[dict], out: Path) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    for column in frame.columns:  # a choice of mixed types (or None) would not make one Parquet column
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    frame.to_parquet(out / "results.parquet", index=False)
    frame.to_csv(out / "results.csv", index=False)


def plot(rows: list[dict], histories: dict[str, list[dict]], spec, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, space = spec.sweep.metric, spec.sweep.space
    plots = out / "plots"
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir(parents=True)
    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        points = [(h["epoch"], h[metric]) for h in histories.get(row["trial"], []) if not _missing(h.get(metric))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", ms=3, lw=1, label=f"{row['trial']} ({row['status']})")
    ax.set(title=f"{metric} per epoch, one line per trial", xlabel="epoch", ylabel=metric)
    if len(rows) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(plots / f"{metric}_per_epoch.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    finished = [r for r in rows if not _missing(r[metric])]
    for path, dim in space.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        numeric = dim.kind in ("uniform", "loguniform", "randint") or all(
            isinstance(r[path], (int, float)) and not isinstance(r[path], bool) for r in finished)
        if numeric:
            ax.scatter([r[path] for r in finished], [r[metric] for r in finished])
            if dim.kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = [str(v) for v in dict.fromkeys(str(r[path]) for r in finished)]
            ax.scatter([labels.index(str(r[path])) for r in finished], [r[metric] for r in finished])
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(title=f"{metric} against {path}", xlabel=path, ylabel=f"{metric} (last epoch)")
        fig.tight_layout()
        written.append(plots / f"{metric}_vs_{path}.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    return written


def _checkpoint_of(row: dict, trial_root: Path) -> Path:
    """The checkpoint of the trial's last reported epoch: in its store (which a stopped trial may have trained
    past), else the copy Tune kept, else the newest there is (model.json then says which epoch it is)."""
    reported = [RunStore(trial_root).checkpoint_dir(row["epochs"])]
    if row["checkpoint"]:
        reported.append(Path(row["checkpoint"]))
    for path in reported:
        if (path / "meta.json").is_file() and json.loads((path / "meta.json").read_text())["epoch"] == row["epochs"]:
            return path
    newest = RunStore(trial_root).latest()
    if newest is None:
        raise FileNotFoundError(f"trial {row['trial']} left no checkpoint to register")
    return newest


def register_best(row: dict, spec, sweep_dir: Path, run_root: Path) -> Path:
    """Make run_root a normal run holding the best trial's model at its last reported epoch, with that
    trial's resolved spec renamed to the sweep's name (and no sweep section)."""
    from raybig.spec import parse_spec, set_path
    from raybig.train.progress import write_curves

    trial_root = sweep_dir / "trials" / f"{spec.name}-{row['trial']}"
    checkpoint = _checkpoint_of(row, trial_root)
    trial_spec = yaml.safe_load((trial_root / "spec.yaml").read_text())
    resolved = set_path(set_path(trial_spec, "name", spec.name), "output.dir", spec.output.dir)
    resolved = parse_spec(resolved, source="the best trial's spec")

    store = RunStore(run_root)
    for name in ("checkpoints", "tensorboard"):  # a previous best's, when a resumed sweep registers again
        shutil.rmtree(run_root / name, ignore_errors=True)
    meta = store.adopt(checkpoint, spec.name)
    info = store.model_info()  # what `raybig lineage` follows back: the sweep this run won
    info["lineage"] = {**info.get("lineage", {}), "sweep": str(sweep_dir.resolve())}
    (run_root / "model.json").write_text(json.dumps(info, indent=1))
    store.write_spec(resolved.to_yaml())
    write_curves(run_root, meta["history"])
    (sweep_dir / "best.json").write_text(json.dumps(
        {"trial": row["trial"], "epoch": meta["epoch"], spec.sweep.metric: row[spec.sweep.metric],
         "config": {p: row[p] for p in spec.sweep.space}, "run": str(run_root)}, indent=1))
    return run_root
