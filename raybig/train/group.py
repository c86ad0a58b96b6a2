"""The worker group of every run: one Ray actor per rank, each in a bundle of a placement group, the
whole group restarted from the last checkpoint when a rank fails.

`raybig run` reserves its own placement group and removes it when the run ends, however it ends. A sweep
trial uses the placement group Ray Tune reserved for it, which Tune itself removes on the driver whenever
the trial stops (ASHA stops it, PBT pauses it, the sweep is interrupted); the ranks are owned by the
actor that started them, so they die with it.

Why not Ray Train's TorchTrainer: it gave raybig nothing the loop did not already do (checkpoints, the
process group, restarts) and cost every run ~20 s here to start and stop its controller and workers
(docs/benchmarks.md, startup). Under Tune it also leaked: Tune ends a trial by ending the trial's actor,
the controller dies with it before it can free its workers' placement group, and that group then holds
its CPUs until Ray Train's cleaner notices, late or never (ray-project/ray#54305).

The ranks run the one loop (raybig.train.worker.run_rank); a rank that dies or fails restarts the whole
group from the last checkpoint, up to failure.max_failures times. A trial of one rank runs it on a thread
of the trial's own process (which then holds the rank's bundle): no process to start, which is most of a
small trial's cost, and PBT restarts trials often.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import ray
import torch

from raybig.phases import phase_item
from raybig.train.runner import (RunFailed, explain_failure, loop_config, rank_resources, relay_progress,
                                 rerun_helps, resource_shortfalls, run_relaying)

# How long a run's ranks may take to come up (a process each, importing torch), and a run's placement
# group to be granted: a busy machine is slow, a broken runtime environment or a full cluster never comes.
START_TIMEOUT_S = float(os.environ.get("RAYBIG_WORKER_START_TIMEOUT_S", "300"))
# torch.distributed's own bound on a collective: a rank whose peer hangs fails instead of waiting forever.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("RAYBIG_COLLECTIVE_TIMEOUT_S", "600"))


class WorkerStartTimeout(RunFailed):
    pass


def trial_bundles(spec) -> list[dict]:
    """A trial's placement group: its own actor first (empty: it only waits on its ranks), then a bundle
    per rank; a single rank runs in the trial's actor, which then takes that rank's bundle."""
    ranks = [rank_resources(spec) for _ in range(spec.parallelism.workers)]
    return ranks if len(ranks) == 1 else [{}] + ranks


def _device(cuda: bool) -> torch.device:
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device


def unschedulable(spec, totals: dict) -> str | None:
    """Why the cluster (its total resources, `ray.cluster_resources()`) can never hold this layout, or None."""
    short = resource_shortfalls(spec, {k: totals.get(k, 0.0) for k in rank_resources(spec)})
    return "; ".join(f"{path}: {message}" for path, message in short) or None


@ray.remote(num_cpus=0)
class Rank:
    """One rank's process. Its resources come from `.options()`: the bundle it is placed in."""

    def warm(self) -> None:
        """Import what a rank needs before a run comes (a spare of `raybig up`: raybig.train.spares)."""
        import torch._dynamo  # noqa: F401  (DDP imports it when it wraps a model: ~1.5 s here)

        import raybig.train.worker  # noqa: F401

    def endpoint(self) -> str:
        with socket.socket() as s:  # a free port for the process group's store, on this node
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def run(self, config: dict, rank: int, world: int, master: str) -> None:
        import torch.distributed as dist

        from raybig.train.worker import run_rank

        cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = _device(cuda)
        if world > 1:
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{master}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        try:
            run_rank(config, rank, world, device)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def fit_on_own_group(spec, bundle, loader: str, store, handle, prune_checkpoints: bool) -> None:
    """`raybig run`: reserve a placement group of one bundle per rank (packed, as few nodes as possible),
    train on it, and remove it whatever happens."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([rank_resources(spec) for _ in range(spec.parallelism.workers)], strategy="PACK")
    try:
        try:
            ray.get(group.ready(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise WorkerStartTimeout(
                f"the cluster did not grant the run's {spec.parallelism.workers} workers x {rank_resources(spec)} "
                f"within {START_TIMEOUT_S:g} s (RAYBIG_WORKER_START_TIMEOUT_S): other work holds them, "
                f"free now {ray.available_resources()}") from None
        handle(phase_item("placement group"))
        _fit_on_ranks(spec, bundle, loader, store, handle, prune_checkpoints, group, first=0)
    finally:
        remove_placement_group(group)


class TrialGate:
    """A sweep trial's progress handler, around the trial's own (which reports to Tune). At an epoch where
    the scheduler may stop the trial (`epochs`, raybig.sweep.driver.gate_epochs), the ranks wait for the
    trial's word (raybig.train.loop): go on once Tune took the report, stop when Tune ended the trial, which
    its report raises as SystemExit. Stopped there, or after its last epoch (`last`, where the ranks end
    anyway), the ranks end cleanly and the next trial Tune gives this actor takes them as they are."""

    def __init__(self, board, epochs, handle, last: int):
        self.board, self.epochs, self.handle, self.last = board, frozenset(epochs), handle, last
        self.stopped = False  # at a gate or the end: the ranks return there

    def __call__(self, item: dict) -> None:
        gated = item["type"] == "epoch" and item["epoch"] in self.epochs
        try:
            self.handle(item)
        except SystemExit:  # the trial is over: a rank waiting at this gate (or any later one) stops there
            self.board.refuse_all.remote()
            self.stopped = gated or (item["type"] == "epoch" and item["epoch"] == self.last)
            raise
        if gated:
            self.board.give_word.remote(item["epoch"], True)


# What a sweep trial's actor keeps between the trials Tune gives it (reuse_actors): its progress board and
# its ranks, by placement group and bundles. A trial that ends at an epoch boundary (finished, or stopped at
# a gate) leaves its ranks fit for the next trial, which then starts no process (docs/benchmarks.md, sweeps).
_kept: dict = {"board": None, "ranks": {}}


def _trial_board():
    if _kept["board"] is None:
        from raybig.train.progress import ProgressBoard

        _kept["board"] = ProgressBoard.remote()
    board = _kept["board"]
    ray.get(board.forget.remote(), timeout=START_TIMEOUT_S)
    return board


def fit_in_trial(spec, bundle, loader: str, store, handle, prune_checkpoints: bool, gate_epochs=()) -> None:
    """A sweep trial: one actor per rank in the last bundles of the trial's placement group (or, for one
    rank, a thread of this process), relaying rank 0's progress to `handle`. The ranks wait for the trial's
    word at `gate_epochs` (TrialGate) and are kept for the actor's next trial."""
    workers = spec.parallelism.workers
    group = ray.util.get_current_placement_group()
    first = len(group.bundle_specs) - workers if group is not None else 0
    if first < 0:
        raise RunFailed(f"the trial's placement group has {len(group.bundle_specs)} bundles for {workers} ranks")
    board = _trial_board()
    gate = TrialGate(board, gate_epochs, handle, spec.train.epochs)
    config = {**loop_config(spec, bundle, loader, store, board, prune_checkpoints), "gate_epochs": sorted(gate_epochs)}
    if workers == 1:
        return _retrying(spec, gate, board, lambda attempt: _train_here({**config, "attempt": attempt},
                                                                        board, gate, spec))
    key = (group.id.hex() if group is not None else None, first, workers, spec.resources.cpus_per_worker,
           spec.resources.gpus_per_worker)

    def attempt(name: str):
        ranks = _alive(_kept["ranks"].pop(key, [])) or _start_ranks(spec, group, first)
        clean = False
        try:
            _train(ranks, {**config, "attempt": name}, board, gate)
            clean = True
        except SystemExit:  # Tune ended the trial: at a gate, the ranks stopped there
            clean = gate.stopped
            raise
        finally:
            if clean:
                _kept["ranks"][key] = ranks
            else:
                _kill(ranks)

    _retrying(spec, gate, board, attempt)


def _start_ranks(spec, group, first: int) -> list:
    """An actor per rank, in bundles first.. of `group` (or anywhere the cluster has room, without one)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = spec.resources
    return [Rank.options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=first + i)
        if group is not None else None).remote() for i in range(spec.parallelism.workers)]


def _alive(ranks: list) -> list:
    """`ranks` if every one still answers, else none of them (ended): a kept rank may have died since."""
    try:
        ray.get([rank.__ray_ready__.remote() for rank in ranks], timeout=START_TIMEOUT_S)
        return ranks
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        _kill(ranks)
        return []


def _kill(ranks: list) -> None:
    for rank in ranks:
        ray.kill(rank, no_restart=True)


def _fit_on_ranks(spec, bundle, loader: str, store, handle, prune_checkpoints: bool, group, first: int) -> None:
    """One actor per rank in bundles first.. of `group`; rank 0's progress is relayed to `handle`."""
    from raybig.train.progress import ProgressBoard

    board = ProgressBoard.remote()
    config = loop_config(spec, bundle, loader, store, board, prune_checkpoints)

    def attempt(name: str):
        from raybig.train import spares

        # the first attempt only (its name ends in its failure count, #0): a restart gets new processes
        taken = spares.take(spec, loader, store.location) if name.endswith("#0") else []
        ranks = taken or _start_ranks(spec, group, first)
        try:
            _train(ranks, {**config, "attempt": name}, board, handle,
                   "rank processes up (spares of raybig up)" if taken else "rank processes up")
        finally:
            _kill(ranks)
            if taken:
                spares.replace_taken()

    _retrying(spec, handle, board, attempt)


def _retrying(spec, handle, board, attempt) -> None:
    """Run `attempt(name)` until it succeeds; any rank's failure starts it again (from the last checkpoint,
    which the loop finds in the store) while failure.max_failures allows. `name` tells the attempts apart
    in the run's history. (A SystemExit, Tune ending a trial, ends it at once: nothing more is relayed.)"""
    failures = 0
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    while True:
        try:
            attempt(f"{started}#{failures}")
        except RunFailed:
            relay_progress(board, handle)
            raise
        except Exception as err:  # a rank's error, or its death (ray.exceptions.RayActorError)
            relay_progress(board, handle)
            failures += 1
            if failures > spec.failure.max_failures or not rerun_helps(err):  # not retried only to fail again
                raise RunFailed(explain_failure(err), rerun_helps(err)) from err
            handle({"type": "restart", "failures": failures, "reason": explain_failure(err)})
        else:
            relay_progress(board, handle)
            return


def _train_here(config: dict, board, handle, spec) -> None:
    """The one rank, on a thread of this process, while this thread relays its progress. Tune ending the
    trial anywhere but at a gate stops the rank at its next step: nothing of it outlives the trial."""
    import threading

    from raybig.train.worker import run_rank

    cuda = spec.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    stop = threading.Event()
    error = run_relaying(lambda: run_rank(config, 0, 1, _device(cuda), stop=stop), board, handle, "raybig-rank-0",
                         stop=stop)
    if error:
        raise error


def _train(ranks: list, config: dict, board, handle, up: str = "rank processes up") -> None:
    try:
        master = ray.get(ranks[0].endpoint.remote(), timeout=START_TIMEOUT_S)
        ray.get([rank.__ray_ready__.remote() for rank in ranks], timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise WorkerStartTimeout(f"the run's {len(ranks)} ranks did not start within {START_TIMEOUT_S:g} s "
                                 "(RAYBIG_WORKER_START_TIMEOUT_S)") from None
    handle(phase_item(up))
    pending = [rank.run.remote(config, i, len(ranks), master) for i, rank in enumerate(ranks)]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            relay_progress(board, handle)
            ray.get(done)  # a rank's error (or death) ends the attempt; the others are killed by the caller
    except SystemExit:
        if getattr(handle, "stopped", False):  # stopped at a gate (TrialGate): the ranks return there
            try:
                ray.get(pending, timeout=START_TIMEOUT_S)
            except Exception:  # they did not end cleanly: the caller kills them
                handle.stopped = False
        raise
