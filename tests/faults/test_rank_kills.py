"""Rank processes SIGKILLed under a real local Ray, once and again and again: the run goes on from its newest
checkpoint each time, every epoch is recorded once, no step is trained twice, and the weights end as those of
a run never stopped (the runs are deterministic)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import RAY_CPUS
from injection import (checkpoint_step, kill_a_worker_after_checkpoint, kill_ranks_repeatedly, run_in_thread,
                       slow_cnn_spec, uninterrupted)
from raybig.spec import load_spec
from raybig.train.checkpoint import load_trained_model
from raybig.train.runner import RunFailed, run

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# benchmarks/soak.py asks for more kills, and other seeds (where in the run they land)
KILLS = int(os.environ.get("RAYBIG_FAULT_KILLS", "5"))
SEED = int(os.environ.get("RAYBIG_FAULT_SEED", "0"))
EPOCHS = max(8, 3 * KILLS // 2)  # long enough for every kill to land on a fresh group with steps to go
pytestmark = [pytest.mark.ray, pytest.mark.timeout(240 + 50 * KILLS)]


def test_interrupted_run_resumes_after_its_last_checkpoint(ray_local, tmp_path):
    spec = slow_cnn_spec(tmp_path, "resume", max_failures=0)
    root = Path(spec.output.dir) / spec.name
    thread, box = run_in_thread(spec)
    kill_a_worker_after_checkpoint(root, "epoch-0002")
    thread.join(timeout=240)
    assert isinstance(box.get("error"), RunFailed)  # no failures allowed: the run stops
    done = max(int(p.name.split("-")[1]) for p in (root / "checkpoints").glob("epoch-*"))
    assert 2 <= done < spec.train.epochs
    first_attempt = {r["attempt"] for r in json.loads((root / "metrics.json").read_text())}

    outcome = run(spec, num_cpus=RAY_CPUS)  # the same spec again
    epochs = [r["epoch"] for r in outcome.history]
    assert outcome.resumed_from == done
    assert epochs == list(range(1, spec.train.epochs + 1))
    resumed = [r for r in outcome.history if r["attempt"] not in first_attempt]
    assert [r["epoch"] for r in resumed] == list(range(done + 1, spec.train.epochs + 1))


def survives_repeated_kills(spec, tmp_path, seed: int) -> dict:
    """Kill a random rank KILLS times while `spec` trains; check what the run recorded against a run never
    stopped, and return its outcome."""
    reference = uninterrupted(spec, tmp_path)
    root = Path(spec.output.dir) / spec.name
    items: list[dict] = []
    thread, box = run_in_thread(spec, items)
    at_kills = kill_ranks_repeatedly(root, KILLS, spec.parallelism.workers, seed, thread)
    thread.join(timeout=400)
    assert "error" not in box, box.get("error")
    history = box["outcome"].history
    assert [r["epoch"] for r in history] == list(range(1, spec.train.epochs + 1))  # each epoch recorded once
    assert history[-1]["attempt"].endswith(f"#{KILLS}")  # the group that finished was the one after the last kill
    # each new group began after the newest checkpoint at its kill: no step before it trained again ...
    steps_per_epoch = len(reference) // spec.train.epochs
    restarts = [i for i, item in enumerate(items) if item["type"] == "restart"]
    assert len(restarts) == KILLS, [items[i] for i in restarts]
    for at_kill, i in zip(at_kills, restarts):
        first = next(item["global_step"] for item in items[i:] if item["type"] == "step")
        assert first > checkpoint_step(at_kill, steps_per_epoch), (at_kill, first)
    # ... and none after it was lost: every step once, each with the loss of the run never stopped
    losses = np.concatenate([r["step_losses"] for r in history])
    np.testing.assert_allclose(losses, reference, rtol=1e-6)
    return box["outcome"]


def test_a_streamed_data_parallel_run_survives_repeated_random_rank_kills(ray_local, tmp_path, monkeypatch):
    # the rows stream from shards (a third of the split fits the memory budget): the position is the batch
    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))
    spec = slow_cnn_spec(tmp_path, "failover", max_failures=KILLS, epochs=EPOCHS,
                         checkpoint={"every_steps": 100, "keep": 2},
                         data={"source": "digits", "loader": "stream", "memory_mb": 1})
    survives_repeated_kills(spec, tmp_path, seed=SEED + 1)
    from raybig.data.shards import open_entry

    (entry,) = (tmp_path / "cache" / "shards").glob("rows-*")
    assert len(open_entry(entry)[0].shards) >= 3


def test_a_data2_x_pipeline2_run_survives_repeated_random_rank_kills(ray_local, tmp_path):
    spec = load_spec(JOBS / "digits_pipeline.yaml", [f"output.dir={tmp_path}", f"train.epochs={EPOCHS}",
                                                     "train.batch_size=16", "checkpoint.every_steps=40",
                                                     f"failure.max_failures={KILLS}"])
    assert spec.parallelism.workers == 4
    outcome = survives_repeated_kills(spec, tmp_path, seed=SEED + 2)
    assert outcome.final["val_accuracy"] > 0.9
    model, info = load_trained_model(outcome.store.root)  # the stages came back as one model
    assert len(model.blocks) == 4 and info["epoch"] == spec.train.epochs
