"""Faults injected into real runs: rank processes found and killed, and what a run never stopped does."""
import random
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from conftest import RAY_CPUS, spec_dict
from raybig.spec import parse_spec
from raybig.train.runner import run


def train_worker_pids() -> list[int]:
    """This session's rank processes (descendants of the raylet this test process started)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("ray::Rank"):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def newest_checkpoint(store_root: Path) -> str:
    """epoch-0002 (two whole epochs), epoch-0001+0000100 (100 batches into the second): the names sort in
    training order."""
    return max((p.name for p in (store_root / "checkpoints").glob("epoch-*")), default="")


def checkpoint_step(name: str, steps_per_epoch: int) -> int:
    epochs, _, batches = name.removeprefix("epoch-").partition("+")
    return int(epochs) * steps_per_epoch + int(batches or 0)


def kill_a_worker_after_checkpoint(store_root: Path, name: str, timeout: float = 240) -> str:
    """Wait for the checkpoint `name`, then SIGKILL one rank process; returns the newest checkpoint at the kill."""
    deadline = time.time() + timeout
    ckpt = store_root / "checkpoints" / name
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    assert ckpt.exists(), "the run never reached the checkpoint"
    pids = train_worker_pids()
    assert pids, "no rank process found"
    psutil.Process(pids[-1]).kill()
    return newest_checkpoint(store_root)


def kill_ranks_repeatedly(store_root: Path, kills: int, workers: int, seed: int, run_thread: threading.Thread,
                          timeout: float = 240) -> list[str]:
    """SIGKILL a random rank `kills` times, each at a random point of a fresh worker group's training: once all
    `workers` ranks of a group none of whose processes was there at the last kill are up and the run has a
    checkpoint newer than the last kill's, after a random 0-0.5 s. Returns the newest checkpoint at each kill."""
    rng = random.Random(seed)
    at_kills: list[str] = []
    seen: set[int] = set()
    while len(at_kills) < kills:
        deadline = time.monotonic() + timeout
        while True:
            assert run_thread.is_alive(), f"the run ended after {len(at_kills)} of {kills} kills"
            assert time.monotonic() < deadline, f"no fresh worker group went on after kill {len(at_kills)}"
            fresh = set(train_worker_pids()) - seen
            newest = newest_checkpoint(store_root)
            if len(fresh) == workers and newest > (at_kills[-1] if at_kills else ""):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
        try:
            psutil.Process(rng.choice(sorted(fresh))).kill()
        except psutil.NoSuchProcess:  # its group was already going down (it finished, or a rank failed)
            seen |= fresh
            continue
        at_kills.append(newest_checkpoint(store_root))
        seen |= fresh
    return at_kills


def slow_cnn_spec(tmp_path, name, max_failures, epochs=8, **sections):
    """Small batches make each epoch last long enough (about a second) for a kill to land mid-run."""
    return parse_spec(spec_dict(
        tmp_path, name=name, model={"kind": "cnn", "channels": [16, 32]}, parallelism={"data": 2},
        train={"epochs": epochs, "batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": 0},
        failure={"max_failures": max_failures}, **{"checkpoint": {"every_epochs": 1, "keep": 3}, **sections}))


def uninterrupted(spec, tmp_path) -> np.ndarray:
    """The step losses of `spec` trained to the end without a stop, in the same layout (local processes)."""
    from multiproc import run_local
    from raybig.train.checkpoint import RunStore

    run_local(spec.model_dump(mode="json"), tmp_path / "uninterrupted")
    return np.concatenate([r["step_losses"] for r in RunStore(tmp_path / "uninterrupted").history()])


def run_in_thread(spec, items: list | None = None):
    """`run(spec)` on a thread; with `items`, its progress items (steps, restarts) are collected there."""
    box = {}

    def target():
        try:
            box["outcome"] = run(spec, num_cpus=RAY_CPUS, on_item=None if items is None else items.append)
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box
