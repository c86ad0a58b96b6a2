"""`raybig sweep`: Ray Tune over full raybig runs, then the results table, plots and the best model.

Why the dashboard is on for sweeps: Tune ends a trial (ASHA stops it, PBT pauses it) by ending the trial's
actor, which takes its Ray Train controller with it before the controller can free its workers' placement
group. Ray Train's cleaner frees it only after asking Ray's state API whether the controller is dead, and
that API is served by the dashboard; without it every stopped trial would keep its CPUs for good.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from raybig.errors import SpecError
from raybig.sweep.space import base_of, mutations, tune_space

@dataclass
class SweepOutcome:
    root: Path  # runs/<name>: the best model as a normal run
    sweep_dir: Path  # runs/<name>/sweep
    rows: list[dict]
    best: dict | None
    interrupted: bool
    seconds: float


# What a trial's own actor reserves: no CPU, since it only waits on its Ray Train workers, which reserve theirs
# in their own placement group (a CPU fraction here would leave 2 x 2 workers unable to fit on 4 CPUs). Tune
# needs some resource to reserve, and the trial does hold its data in memory.
TRIAL_DRIVER = {"memory": 256 * 1024 * 1024}


def sweep_paths(spec) -> tuple[Path, Path]:
    from raybig.store_io import is_uri

    if is_uri(spec.output.dir):
        raise SpecError("a sweep keeps its trials on a file system path (one node, or storage every node mounts); "
                        "object-store URIs are for single runs", "output.dir")
    root = (Path(spec.output.dir) / spec.name).resolve()
    return root, root / "sweep"


def trial_dirname(trial) -> str:
    return trial.trial_id


def _scheduler(sweep, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        # the trial's own epoch count, not Tune's report count, which restarts are free to renumber
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations(sweep), quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability)
    return FIFOScheduler()


def _quiet_tune() -> None:
    """The live table replaces Tune's own console output; its warning about frequent experiment snapshots is
    about per-epoch checkpoints, which PBT and --resume need."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # the results table names each trial's error


def _searcher(sweep):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    # max_concurrent here as well as in TuneConfig: trial actors ask for no CPUs (their workers do, through
    # their own placement groups), so Tune's resource check alone would start every trial at once
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent)


def expected_trials(sweep) -> int:
    grids = [len(d.args) for d in sweep.space.values()
             if d.kind == "grid" or (d.kind == "choice" and sweep.searcher == "grid")]
    combinations = math.prod(grids) if grids else 1
    return combinations * (1 if sweep.searcher == "grid" else sweep.num_trials)


def _interrupted(grid, sweep, seconds: float) -> bool:
    """Ctrl-C leaves trials running or pending, or (trials being created one by one as others end) fewer
    trials than the sweep asks for; a spent time budget ends a sweep early without interrupting it."""
    unfinished = grid.num_terminated + grid.num_errors < len(grid)
    budget_spent = sweep.time_budget_s is not None and seconds >= sweep.time_budget_s
    return unfinished or (len(grid) < expected_trials(sweep) and not budget_spent)


def _absolute_paths(base: dict) -> dict:
    """Trials run in other processes and directories: make the spec's file paths absolute."""
    data = dict(base.get("data", {}))
    for key in ("path", "val_path"):
        if data.get(key) and "://" not in data[key]:
            data[key] = str(Path(data[key]).resolve())
    return {**base, "data": data}


def run_sweep(spec, *, resume: bool = False, fresh: bool = False, address: str | None = None,
              num_cpus: float | None = None, verbose: bool = False, console=None) -> SweepOutcome:
    from ray import tune

    from raybig.cluster import cluster_cpus, embedded_cpus, ray_session
    from raybig.data.datasets import describe
    from raybig.sweep.live import LiveTable
    from raybig.sweep.results import best_row, plot, register_best, trial_rows, write_table
    from raybig.sweep.trial import run_trial
    from raybig.train.runner import check_plan

    sweep = spec.sweep
    if sweep is None:
        raise SpecError("the spec has no sweep section; add one (see docs/sweeps.md)", "sweep")
    root, sweep_dir = sweep_paths(spec)
    meta = describe(spec.data)
    check_plan(spec, meta, None if address else embedded_cpus(num_cpus))
    tune_dir = sweep_dir / "tune"
    if fresh:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    if resume and not tune_dir.is_dir():
        raise SpecError(f"{sweep_dir} holds no sweep to resume; run without --resume", "--resume")
    if not resume and tune_dir.exists():
        raise SpecError(f"{sweep_dir} holds a sweep already: pass --resume to continue it, or --fresh to start "
                        "over", "name")
    started = time.perf_counter()
    _quiet_tune()
    live = LiveTable(spec, console)
    with ray_session(address, num_cpus, verbose, dashboard=True):
        if address:
            check_plan(spec, meta, cluster_cpus())
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=_absolute_paths(base_of(spec)), space=sweep.space,
                                 root=str(sweep_dir)),
            TRIAL_DRIVER)
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space(sweep),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=sweep.goal,
                    num_samples=1 if sweep.searcher == "grid" else sweep.num_trials,
                    search_alg=_searcher(sweep), scheduler=_scheduler(sweep, spec.train.epochs),
                    max_concurrent_trials=sweep.max_concurrent if sweep.searcher == "optuna" else None,
                    time_budget_s=sweep.time_budget_s,
                    trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[live],
                    # Under PBT, Tune prunes nothing: it hands a donor's checkpoint to a paused trial that
                    # may start only after the donor's own pruning deleted it ("does not exist on storage
                    # anymore"), and it registers each checkpoint twice, so pruning deletes one twice.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sweep.scheduler.name == "pbt" else 2),
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
        try:
            grid = tuner.fit()
        finally:
            live.close()
    rows, histories = trial_rows(grid, spec, sweep_dir)
    write_table(rows, sweep_dir)
    plot(rows, histories, spec, sweep_dir)
    interrupted = _interrupted(grid, sweep, time.perf_counter() - started)
    best = None if interrupted else best_row(rows, spec)
    if best is not None:
        register_best(best, spec, sweep_dir, root)
    return SweepOutcome(root, sweep_dir, rows, best, interrupted, time.perf_counter() - started)
