"""The driver side of `raybig run`: check the plan, prepare the store, start the worker group, show progress."""
from __future__ import annotations

import os
import socket
import threading
import warnings
import time
from dataclasses import dataclass, field

import yaml
from rich.markup import escape

from raybig.data.datasets import DataMeta, describe, load
from raybig.data.loader import choose_loader
from raybig.errors import SpecError
from raybig.models import build_model
from raybig.spec import JobSpec
from raybig.train.checkpoint import RunStore


class RunFailed(RuntimeError):
    """A run that stopped short of its end. `rerun_helps`: whether the same command again can get past it (a
    process or node lost, a timeout), rather than meet the same error raised by the run's own code or data."""

    def __init__(self, message: str, rerun_helps: bool = True):
        super().__init__(message)
        self.rerun_helps = rerun_helps


# Raised by a rank's own code on the same batch, from the same checkpoint, every time: a rerun meets it again.
# (A RuntimeError may be a lost peer's broken connection: it is not among them.)
REPEATABLE = (FloatingPointError, SpecError, TypeError, ValueError, AttributeError, ImportError, KeyError,
              IndexError, NotImplementedError, AssertionError, ZeroDivisionError, FileNotFoundError)


def rerun_helps(err: BaseException) -> bool:
    """Ray raises a rank's error as a RayTaskError that is also an instance of the error's own class."""
    return not isinstance(err, REPEATABLE)


@dataclass
class RunOutcome:
    store: RunStore
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    already_complete: bool = False
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def check_plan(spec: JobSpec, meta: DataMeta, cpus: float | None) -> list[str]:
    """Cross-checks that need the data or the cluster's CPUs (where known), made before any worker starts;
    a registered version the spec starts from or distils from is fetched, and the spec names its files.
    Returns notes for the user: what fine-tuning loads, which teacher distils."""
    from raybig.lifecycle.registry import resolve_registered

    problems, notes = [], []
    resolve_registered(spec)
    wanted = getattr(spec.model, "num_classes", None)
    if wanted is not None and wanted != meta.num_classes:
        problems.append(("model.num_classes", f"{wanted}, but the data has {meta.num_classes} classes"))
    pipe = spec.parallelism.pipeline
    try:
        model = build_model(spec.model, meta)
        if spec.model.kind == "python":
            from raybig.models.user import check_output

            check_output(model, spec.model, meta)
        if pipe.stages > 1:
            problems += stage_problems(spec, model, meta)
        problems += layer_problems(spec, model)
        if spec.init_from is not None:
            from raybig.train.finetune import check_init

            notes.append(f"init_from: {check_init(model, spec)}")
        if spec.distill is not None:
            from raybig.train.distill import check_teacher

            notes.append(f"distill: {check_teacher(spec, meta)}")
    except SpecError as err:
        problems += err.problems
    except ValueError as err:
        problems.append(("model.kind", f"{spec.model.kind}: {err}"))
    if pipe.stages > 1 and pipe.microbatches < pipe.total_stages:
        warnings.warn(f"parallelism.pipeline.microbatches: {pipe.microbatches} microbatches for "
                      f"{pipe.total_stages} stages: the pipeline bubble will dominate the step time", stacklevel=2)
    if cpus is not None:
        problems += resource_shortfalls(spec, {"CPU": cpus})
    if problems:
        raise SpecError(problems)
    return notes


def layer_problems(spec: JobSpec, model) -> list[tuple[str, str]]:
    """Tensor parallelism needs the model's plan, dividing its layers; activation checkpointing, its blocks."""
    from raybig.models.parts import NoParts, model_parts
    from raybig.train.tensor_parallel import tensor_problems

    out = []
    if spec.parallelism.tensor > 1:
        out += [("parallelism.tensor", problem) for problem in tensor_problems(model, spec.parallelism.tensor)]
    if spec.train.activation_checkpointing != "none":
        try:
            model_parts(model, getattr(spec.model, "blocks", None))
        except NoParts as err:
            out.append(("train.activation_checkpointing", f"it checkpoints blocks, and the {spec.model.kind} model "
                        f"has none: {err}"))
    return out


def stage_problems(spec: JobSpec, model, meta: DataMeta) -> list[tuple[str, str]]:
    """Pipeline stages need the model's parts, checked to reproduce its forward, and enough of them."""
    from raybig.models.parts import NoParts, check_parts, model_parts, probe_batch

    pipe = spec.parallelism.pipeline
    try:
        parts = model_parts(model, getattr(spec.model, "blocks", None))
        check_parts(model, parts, probe_batch(meta))
    except NoParts as err:
        return [("parallelism.pipeline.stages", f"the {spec.model.kind} model cannot be cut into stages: {err}; "
                 "it trains data-parallel")]
    if pipe.total_stages > len(parts):
        return [("parallelism.pipeline.stages", f"{pipe.total_stages} stages but the {spec.model.kind} model has "
                 f"{len(parts)} parts")]
    if pipe.split_points and pipe.split_points[-1] >= len(parts):
        return [("parallelism.pipeline.split_points", f"part {pipe.split_points[-1]} does not exist: the "
                 f"{spec.model.kind} model has parts 0..{len(parts) - 1}")]
    return []


def rank_resources(spec: JobSpec) -> dict[str, float]:
    """What one rank reserves: its bundle of the run's or the sweep trial's placement group."""
    res = spec.resources
    return {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}


def resource_shortfalls(spec: JobSpec, totals: dict) -> list[tuple[str, str]]:
    """What the layout needs beyond the cluster's `totals` (e.g. `ray.cluster_resources()`; a resource left out
    is not checked): Ray would wait for it for good."""
    workers = spec.parallelism.workers
    fields = {"CPU": ("parallelism.data", "resources.cpus_per_worker", "lower the degree or the CPUs per worker"),
              "GPU": ("resources.gpus_per_worker", "resources.gpus_per_worker", "Ray would wait for them for good")}
    out = []
    for key, each in rank_resources(spec).items():
        need = workers * each
        if key in totals and need > totals[key]:
            path, field, hint = fields[key]
            out.append((path, f"{workers} workers x {field} {each:g} need {need:g} {key}s but the cluster has "
                        f"{totals[key]:g}; {hint}"))
    return out


def check_resources(spec: JobSpec, totals: dict) -> None:
    """The resource part of check_plan, against a running cluster's totals."""
    problems = resource_shortfalls(spec, {k: totals.get(k, 0.0) for k in rank_resources(spec)})
    if problems:
        raise SpecError(problems)


def _same_run(stored: dict, spec: JobSpec) -> list[str]:
    """Sections that must not change for a rerun to resume (epochs may grow; the model and data may not)."""
    new = spec.model_dump(mode="json")
    return [key for key in ("model", "data") if stored.get(key) != new[key]]


def prepare_store(spec: JobSpec, fresh: bool) -> tuple[RunStore, tuple[int, int]]:
    from raybig.store_io import join, open_run_store

    store = open_run_store(join(spec.output.dir, spec.name))  # a path, or an s3:// / gs:// URI
    spec_file = store.root / "spec.yaml"
    if fresh:
        store.discard()
    latest = store.latest()
    if latest is not None and spec_file.exists():
        changed = _same_run(yaml.safe_load(spec_file.read_text()) or {}, spec)
        if changed:
            raise SpecError(f"{store.location} holds a run with a different {' and '.join(changed)} section; "
                            "pass --fresh to start over, or choose another name", "name")
    return store, resume_point(store)


def resume_point(store: RunStore) -> tuple[int, int]:
    """(whole epochs, steps) the newest checkpoint holds; (0, 0) without one."""
    import json

    latest = store.latest()
    if latest is None:
        return 0, 0
    meta = json.loads((latest / "meta.json").read_text())
    return meta["epoch"], meta["step"]


def finished(spec: JobSpec, epochs: int, steps: int) -> bool:
    return steps >= spec.train.max_steps if spec.train.max_steps else epochs >= spec.train.epochs


def keep_tokenizer(store: RunStore, meta: DataMeta) -> None:
    """A language model's tokenizer goes into its run (tokenizer.json), for serving and resuming; a run that
    resumes must have been trained with the same one."""
    from raybig.data.tokenizer import TOKENIZER_FILE, digest_of

    text = meta.extra.get("tokenizer_json")
    if not text:
        return
    path = store.root / TOKENIZER_FILE
    if store.latest() is not None and path.is_file() and digest_of(path.read_text(encoding="utf-8")) != meta.tokenizer:
        raise SpecError(f"{store.location} was trained with another tokenizer than this data gives; pass --fresh "
                        "to start over, or choose another name", "data.tokenizer")
    store.root.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    store.saved(TOKENIZER_FILE)


def run(spec: JobSpec, *, address: str | None = None, num_cpus: float | None = None, fresh: bool = False,
        verbose: bool = False, console=None, on_item=None, prune_checkpoints: bool = True,
        fit_with=None, phases=None) -> RunOutcome:
    """Train `spec` to its last epoch. Progress (steps, finished epochs) goes to a live view on `console`,
    or to `on_item(item)` when given (a sweep trial relays finished epochs to Ray Tune). Without
    `prune_checkpoints` every epoch checkpoint stays until the caller prunes the store. `fit_with` starts
    the worker group (raybig.train.group): the run's own placement group by default, a sweep trial's in a
    sweep. `phases` (raybig.phases.Phases), when given, takes a mark at the end of each phase."""
    import ray

    from raybig.cluster import embedded_cpus, ray_session
    from raybig.phases import Phases, RankMarks
    from raybig.train.group import fit_on_own_group
    from raybig.train.progress import ProgressView, write_curves

    from raybig.data.streaming import streams

    if streams(spec.data) and not ray.is_initialized():  # Ray Data tokenizes it: Ray is up before it is read
        with ray_session(address, num_cpus, verbose):
            return run(spec, address=address, num_cpus=num_cpus, fresh=fresh, verbose=verbose, console=console,
                       on_item=on_item, prune_checkpoints=prune_checkpoints, fit_with=fit_with, phases=phases)
    phases = phases or Phases()
    meta = describe(spec.data, spec.model)
    notes = check_plan(spec, meta, None if address else embedded_cpus(num_cpus))
    if console is not None:
        for note in notes:
            console.print(f"  {escape(note)}", highlight=False)
    store, (done, done_steps) = prepare_store(spec, fresh)
    if finished(spec, done, done_steps):
        return RunOutcome(store, store.history(), resumed_from=done, already_complete=True)
    store.write_spec(spec.to_yaml())
    from raybig.lifecycle.registry import start_tracking

    tracker = start_tracking(spec) if on_item is None else None  # a sweep's trials are tracked by the sweep
    bundle = load(spec.data, spec.model)
    keep_tokenizer(store, bundle.meta)
    loader, bundle = pick_loader(spec, bundle)
    phases.mark("data and checks")
    started = time.perf_counter()
    with ray_session(address, num_cpus, verbose) as how:
        phases.mark(f"ray: {how}")
        check_resources(spec, ray.cluster_resources())
        fit = fit_with or fit_on_own_group
        if on_item is not None:
            fit(spec, bundle, loader, store, RankMarks(phases, on_item, spec.train.epochs), prune_checkpoints)
        else:
            with ProgressView(spec, console, resumed_at=(done, done_steps), damaged=store.damaged()) as view:
                fit(spec, bundle, loader, store, RankMarks(phases, view.handle, spec.train.epochs),
                    prune_checkpoints)
        phases.mark("last step to results: evaluation, checkpoint, ranks end")
        history = store.history()
        # drawn while Ray stops: both take most of a second here, and neither needs the other
        failed: list[BaseException] = []
        curves = threading.Thread(target=_capturing(failed, write_curves, store.root, history), name="raybig-curves")
        curves.start()
    phases.mark("ray: stop" if how == "started" else "ray: disconnect")
    curves.join()
    if failed:
        raise failed[0]
    store.saved("curves.png", "tensorboard")
    phases.mark("curves and TensorBoard (after Ray's stop)")
    if tracker is not None:
        tracker.finish(store.root, console)
        phases.mark("tracking (MLflow)")
    return RunOutcome(store, history, resumed_from=done, seconds=time.perf_counter() - started)


def _capturing(failed: list, fn, *args):
    """`fn(*args)` for a thread: its error lands in `failed` for the thread that joins it."""
    def target():
        try:
            fn(*args)
        except BaseException as err:
            failed.append(err)
    return target


def loop_config(spec: JobSpec, bundle, loader: str, store: RunStore, board=None, prune_checkpoints: bool = True) -> dict:
    """What every rank is handed, whichever worker group runs it (raybig.train.worker.run_rank)."""
    import ray

    if loader == "memory":  # every rank holds the small splits whole: through the object store, without Ray
        # Data's actors, whose polling took CPU from the ranks for the whole run (docs/benchmarks.md, pipeline bubble)
        splits = {"train": ray.put((bundle.train.x, bundle.train.y)), "val": ray.put((bundle.val.x, bundle.val.y))}
    else:  # shards on disk, which every rank reads its slice of (raybig.data.shards)
        splits = {"train": str(bundle.train.directory), "val": str(bundle.val.directory)}
    return {"spec": spec.model_dump(mode="json"), "meta": bundle.meta.to_dict(), "loader": loader,
            "tokenizer_json": bundle.meta.extra.get("tokenizer_json"),  # rank 0 writes it into hf/
            "store": store.location, "threads": max(1, int(spec.resources.cpus_per_worker)), "board": board,
            "splits": splits, "prune_checkpoints": prune_checkpoints,
            "driver": {"host": socket.gethostname(), "pid": os.getpid()}}  # the ranks end if it dies


def pick_loader(spec: JobSpec, bundle) -> tuple[str, object]:
    """(memory or stream, the bundle the ranks read): data read into memory that should stream is written as
    shards first (a corpus that streams was tokenized into them)."""
    from raybig.data.datasets import Split
    from raybig.data.remote import local_paths
    from raybig.data.shards import sharded_bundle
    from raybig.data.token_cache import cache_key

    if not isinstance(bundle.train, Split):
        return "stream", bundle
    memory = spec.data.memory_mb * 2**20
    loader = choose_loader(spec.data.loader, bundle.nbytes, memory)
    augment = getattr(spec.data, "augment", None)
    if loader == "stream" and augment is not None and (augment.flip or augment.crop_padding):
        raise SpecError(f"flips and crops are drawn per image by the memory loader, but these {bundle.nbytes / 2**20:.0f} "
                        "MB stream: set data.loader: memory, or leave data.augment out", "data.augment")
    if loader == "stream":
        # keyed by the files read: an object store's, in their local mirror
        bundle = sharded_bundle(bundle, "rows-" + cache_key(local_paths(spec.data), spec.model), memory)
    return loader, bundle


def run_relaying(work, board, handle, name: str, stop=None) -> BaseException | None:
    """Run `work` on a thread while this one relays the progress board to `handle`; returns its error. When
    relaying raises SystemExit (Tune ended the trial), `stop` (a threading.Event the work watches) is set
    unless the work stopped at a gate (TrialGate), and the thread is waited for: it outlives nothing."""
    error: list[BaseException] = []
    thread = threading.Thread(target=_capturing(error, work), name=name, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            relay_progress(board, handle)
        relay_progress(board, handle)
    except SystemExit:
        if stop is not None and not getattr(handle, "stopped", False):
            stop.set()
        thread.join(timeout=BOARD_TIMEOUT_S)
        raise
    return error[0] if error else None


# How long the driver waits for the progress board (a zero-CPU actor of its own) to answer one drain.
BOARD_TIMEOUT_S = 60.0


def relay_progress(board, handle) -> None:
    import ray

    try:
        items = ray.get(board.drain.remote(), timeout=BOARD_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RunFailed(f"the run's progress board did not answer within {BOARD_TIMEOUT_S:g} s") from None
    for item in items:
        handle(item)


def explain_failure(err: BaseException) -> str:
    from raybig.cluster import logs_dir

    where = logs_dir()
    return _explain(err) + (f"\nworker logs: {where}" if where else "")


def _explain(err: BaseException) -> str:
    """The worker's own error, not Ray's wrapping of it."""
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
