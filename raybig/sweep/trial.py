"""One sweep trial: a full raybig run (its own ranks and layout) of the base spec with the sampled values
set, inside a Ray Tune trial. The ranks are the trial's own actors, in the bundles Tune reserved for it
(raybig.train.group), so whatever ends the trial frees them.

Each finished epoch is reported to Tune with a copy of that epoch's checkpoint, so schedulers act per
epoch and a trial can be continued from a checkpoint: its own after an interrupted sweep resumes, or a
better trial's when PBT exploits. Either way the trial's model store is rebuilt from that checkpoint
before training, so the store and Tune agree on where the trial stands. Small models finish several
epochs between two relays, so the workers leave every checkpoint in place and the trial prunes the
store only after Tune has its copy.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from raybig.phases import Phases
from raybig.sweep.space import clip_to_space, trial_spec
from raybig.train.checkpoint import RunStore

# Reported to Tune for every epoch: scalars only (per-step losses and per-rank lists stay in the store).
REPORTED = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
            "val_perplexity", "val_token_accuracy", "val_mse", "val_mae", "tokens_per_s", "lr", "samples_per_s",
            "epoch_seconds")


def run_trial(config: dict, *, base: dict, space: dict, root: str, gates: list[int], cache: str = "",
              driver: dict | None = None) -> None:
    """The Tune trainable. `space` is the sweep's space (for clipping PBT's perturbations), `root` the
    sweep's directory; the trial's run lives in root/trials/<trial id>/. At the epochs in `gates` the
    ranks wait for Tune's word (raybig.train.group.TrialGate). `cache` is the driver's RAYBIG_CACHE;
    `driver` the sweep's driver process: a trial whose sweep driver is gone ends its process (on a warm Ray
    it would train on until Ray saw the sweep's job gone), and its ranks with it."""
    import os

    if cache:  # a warm Ray's processes have the environment of `raybig up`, not the sweep's: use its cache
        os.environ["RAYBIG_CACHE"] = cache
    from raybig.train.worker import watch_driver

    watching = watch_driver(driver)
    try:
        _run_trial(config, base=base, space=space, root=root, gates=gates)
    finally:
        watching.set()


def _run_trial(config: dict, *, base: dict, space: dict, root: str, gates: list[int]) -> None:
    import functools
    import os

    from ray import tune

    import ray

    from raybig.cluster import cluster_cpus
    from raybig.train.group import fit_in_trial, unschedulable
    from raybig.train.runner import RunFailed, run

    started = time.time()
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(base, clip_to_space(config, space), f"{base['name']}-{trial_id}", str(Path(root) / "trials"))
    reason = unschedulable(spec, ray.cluster_resources())
    if reason:  # Tune gave it no bundles (raybig.sweep.driver.trial_resources): it could wait for ever
        raise RunFailed(reason)
    store = RunStore(Path(spec.output.dir) / spec.name)
    restored = tune.get_checkpoint()
    if restored is None and _ended_before(store, config):
        return
    store.discard()  # a trial starts from Tune's checkpoint or from scratch, never from leftovers
    if restored is not None:
        with restored.as_directory() as directory:
            history = _install(Path(directory), store)
        store.write_spec(spec.to_yaml())
        if history[-1]["epoch"] >= spec.train.epochs:  # PBT handed it a finished model: that is its result
            _report(history[-1], store)
            return

    # where this trial's time went (`raybig sweep --profile-startup`), kept up to date at every epoch: Tune
    # may end the trial's actor (its last trial, stopped) without the trial's own code running again
    phases = Phases(started, "trial starts")
    phases.mark("trial set-up: store, checkpoint")
    phases.facts["trial_pid"] = os.getpid()  # Tune hands an actor trial after trial (reuse_actors)

    def save_phases() -> None:
        (store.root / "startup.json").write_text(json.dumps(phases.to_dict()))

    def relay(item: dict) -> None:
        if item["type"] == "epoch":
            save_phases()
            _report(item, store)
            store.prune(spec.checkpoint.keep, through_epoch=item["epoch"])

    # Tune hands this actor its next trial once this one's thread has ended; it waits 2 s by default, and a
    # trial stopped mid-epoch ends its rank at the next step first
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    try:
        run(spec, num_cpus=cluster_cpus(), on_item=relay, prune_checkpoints=False,
            fit_with=functools.partial(fit_in_trial, gate_epochs=gates), phases=phases)
    except RunFailed as err:
        if not err.rerun_helps:  # a diverged loss, the trial's own error: it would fail the same way again
            _write_ended(store, config, reason=str(err))
        raise
    else:
        _write_ended(store, config)
    finally:
        phases.mark("trial ends")
        save_phases()


ENDED = "ended.json"


def _write_ended(store: RunStore, config: dict, reason: str | None = None) -> None:
    """Record how the trial ended (finished, or `reason` it failed for) in its own store, as soon as it has.
    Tune saves its record of the sweep every several seconds: a sweep whose driver was killed in between
    resumes such a trial as unfinished, and then meets this record instead of training it again."""
    ended = {"config": config, **({"reason": reason} if reason is not None else {})}
    (store.root / ENDED).write_text(json.dumps(ended, default=str))


def _ended_before(store: RunStore, config: dict) -> bool:
    """Whether this trial, with this config, ended before (raybig.sweep.trial._write_ended): then its last
    result goes to Tune again, or its error is raised again, and it trains nothing."""
    from raybig.train.runner import RunFailed

    try:
        ended = json.loads((store.root / ENDED).read_text())
    except (OSError, ValueError):
        return False
    if ended.get("config") != json.loads(json.dumps(config, default=str)):
        return False
    if "reason" in ended:
        raise RunFailed(ended["reason"], rerun_helps=False)
    _report(store.history()[-1], store)
    return True


def _install(checkpoint: Path, store: RunStore) -> list[dict]:
    """Make `checkpoint` (a copy of some trial's epoch checkpoint) this store's only checkpoint and its
    published model; returns the history it carries."""
    meta = store.adopt(checkpoint, store.root.name)
    # where this trial's weights came from: itself after a resume, another trial when PBT exploited it
    (store.root / "restored.json").write_text(json.dumps({"run": meta.get("run"), "epoch": meta["epoch"]}))
    return meta["history"]


def _report(record: dict, store: RunStore) -> None:
    from ray import tune

    metrics = {k: record[k] for k in REPORTED if k in record}
    source = store.checkpoint_dir(record["epoch"])
    if not (source / "meta.json").is_file():  # no checkpoint this epoch (checkpoint.every_epochs)
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raybig-trial-") as tmp:
        copy = Path(tmp) / "checkpoint"
        shutil.copytree(source, copy)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(copy)))
