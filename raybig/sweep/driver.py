"""`raybig sweep`: Ray Tune over full raybig runs, then the results table, plots and the best model.

Each trial asks Tune for one placement group: an empty bundle for the trial's own actor and one bundle per
rank, in which the trial starts its ranks (raybig.train.group). Tune creates and removes that group on the
driver as trials start, stop, pause and fail, so a trial's CPUs are free the moment Tune is done with it,
and Tune starts only as many trials as the cluster holds. Nothing depends on the dashboard or on Ray
Train's placement-group cleaner (which left stopped trials' CPUs taken: ray-project/ray#54305).
"""
from __future__ import annotations

import functools
import math
import os
import socket
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from raybig.errors import SpecError
from raybig.sweep.space import apply_config, base_of, clip_to_space, mutations, trial_spec, tune_space

@dataclass
class SweepOutcome:
    root: Path  # runs/<name>: the best model as a normal run
    sweep_dir: Path  # runs/<name>/sweep
    rows: list[dict]
    best: dict | None
    interrupted: bool
    seconds: float


def trial_resources(config: dict, *, base: dict, space: dict):
    """The placement group of one trial (Tune calls this per sampled config, on the driver): a bundle per
    rank, and an empty one for the trial's actor unless it runs the only rank itself. A layout the cluster can never hold
    gets a token bundle instead, so the trial starts, fails at once with the reason, and the sweep goes on
    (Tune would otherwise keep it pending for good)."""
    import ray
    from ray.tune import PlacementGroupFactory

    from raybig.train.group import trial_bundles, unschedulable

    spec = trial_spec(base, clip_to_space(config, space), base["name"], "unused")
    if unschedulable(spec, ray.cluster_resources()):
        return PlacementGroupFactory([{"memory": 1}])
    return PlacementGroupFactory(trial_bundles(spec), strategy="PACK")


def concurrency_note(spec, cpus: float) -> str | None:
    """When max_concurrent trials of the base layout cannot all fit, how many will run at once."""
    need = spec.parallelism.workers * spec.resources.cpus_per_worker
    fits = int(cpus // need) if need else spec.sweep.max_concurrent
    if fits >= spec.sweep.max_concurrent:
        return None
    return (f"sweep.max_concurrent: {spec.sweep.max_concurrent} trials x {need:g} CPUs do not fit the cluster's "
            f"{cpus:g} CPUs; {fits} run at a time")


def check_model_axes(spec, meta) -> None:
    """An axis under model. (model.args.width, model.config.hidden_size) changes the model itself: build it
    at each of the axis's probe values, so a value the factory or the config refuses stops the sweep before
    any trial starts rather than failing every trial that samples it."""
    from raybig.spec import parse_spec
    from raybig.train.runner import check_plan

    base = base_of(spec)
    for path, dim in spec.sweep.space.items():
        if not path.startswith("model."):
            continue
        for value in dim.probes():
            try:
                check_plan(parse_spec(apply_config(base, {path: value})), meta, None)
            except SpecError as err:
                problem_path, message = err.problems[0]
                raise SpecError(f"{value!r}: {problem_path}: {message}", f"sweep.space.{path}") from None


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
                                       resample_probability=s.resample_probability, synch=s.synch)
    return FIFOScheduler()


def gate_epochs(sweep, epochs: int) -> list[int]:
    """The epochs where the sweep's scheduler may stop or pause a trial before its last: ASHA's rungs, PBT's
    perturbation points. A trial's ranks wait for Tune's word there (raybig.train.group.TrialGate), so a
    trial stopped by the scheduler ends at an epoch boundary and leaves its ranks to the next trial."""
    s = sweep.scheduler
    if s.name == "asha":  # the rungs of Tune's one-bracket ASHA: grace x rf^k below max_t
        if epochs < s.grace_period:
            return []
        rungs = int(math.log(epochs / s.grace_period) / math.log(s.reduction_factor) + 1)
        return sorted({int(s.grace_period * s.reduction_factor ** k) for k in range(rungs)} - {epochs})
    if s.name == "pbt":
        return list(range(s.perturbation_interval, epochs, s.perturbation_interval))
    return []


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


def _track(spec, sweep_dir: Path, rows: list[dict], best_run: Path | None, console) -> None:
    """The sweep, its trials and its best run into MLflow (spec `tracking`); a failing store only warns."""
    from raybig.lifecycle.registry import track_sweep, tracking_uri

    uri = tracking_uri(spec)
    if uri is None:
        return
    try:
        rid = track_sweep(sweep_dir, rows, spec, uri, best_run)
    except Exception as err:
        from rich.markup import escape

        console.print(f"[yellow]tracking failed[/] ({escape(uri)}): {escape(str(err).splitlines()[0])}", highlight=False)
        return
    console.print(f"tracked: MLflow run {rid} and {len(rows)} trial runs ({uri})", highlight=False)


def run_sweep(spec, *, resume: bool = False, fresh: bool = False, address: str | None = None,
              num_cpus: float | None = None, verbose: bool = False, console=None) -> SweepOutcome:
    import ray
    from ray import tune

    from raybig.cluster import cluster_cpus, embedded_cpus, ray_session
    from raybig.data.datasets import cache_dir, describe
    from raybig.data.streaming import streams
    from raybig.sweep.live import LiveTable
    from raybig.sweep.results import best_row, plot, register_best, trial_rows, write_table
    from raybig.sweep.trial import run_trial
    from raybig.train.runner import check_plan, check_resources

    sweep = spec.sweep
    if sweep is None:
        raise SpecError("the spec has no sweep section; add one (see docs/sweeps.md)", "sweep")
    if streams(spec.data) and not ray.is_initialized():  # Ray Data tokenizes it, on the sweep's own Ray
        with ray_session(address, num_cpus, verbose):
            return run_sweep(spec, resume=resume, fresh=fresh, address=address, num_cpus=num_cpus, verbose=verbose,
                             console=console)
    root, sweep_dir = sweep_paths(spec)
    meta = describe(spec.data, spec.model)
    check_plan(spec, meta, None if address else embedded_cpus(num_cpus))
    check_model_axes(spec, meta)
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
    base = _absolute_paths(base_of(spec))
    with ray_session(address, num_cpus, verbose):
        check_resources(spec, ray.cluster_resources())
        note = concurrency_note(spec, cluster_cpus())
        if note:
            live.console.print(f"[yellow]{note}[/]", highlight=False)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, space=sweep.space, root=str(sweep_dir),
                                 gates=gate_epochs(sweep, spec.train.epochs), cache=str(cache_dir()),
                                 driver={"host": socket.gethostname(), "pid": os.getpid()}),
            functools.partial(trial_resources, base=base, space=sweep.space))
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
                    # a trial's actor (and the ranks it keeps) goes on to the next trial of the same layout
                    time_budget_s=sweep.time_budget_s, reuse_actors=True,
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
    _track(spec, sweep_dir, rows, root if best is not None else None, live.console)
    return SweepOutcome(root, sweep_dir, rows, best, interrupted, time.perf_counter() - started)
