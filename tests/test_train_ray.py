"""End to end on a real local Ray: a rank per actor, DDP over gloo, Ray Data, checkpoints, failures."""
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import RAY_CPUS, spec_dict
from raybig.cli import app
from raybig.data.datasets import load
from raybig.spec import load_spec, parse_spec
from raybig.train.checkpoint import load_trained_model
from raybig.train.runner import RunFailed, run

JOBS = Path(__file__).resolve().parents[1] / "jobs"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(480)]


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    spec = load_spec(JOBS / "digits_cnn.yaml", [f"output.dir={out}"])
    return spec, run(spec, num_cpus=RAY_CPUS)


def test_demo_reaches_95_percent_with_two_data_parallel_workers(demo):
    spec, outcome = demo
    assert spec.parallelism.data == 2
    assert [r["epoch"] for r in outcome.history] == list(range(1, spec.train.epochs + 1))
    assert outcome.final["val_accuracy"] >= 0.95
    for key in ("val_loss", "val_precision", "val_recall", "val_f1", "samples_per_s"):
        assert outcome.final[key] > 0


def test_demo_leaves_a_complete_model_store(demo):
    spec, outcome = demo
    root = outcome.store.root
    for name in ("spec.yaml", "model.safetensors", "model.json", "metrics.json", "curves.png"):
        assert (root / name).is_file(), name
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert parse_spec(__import__("yaml").safe_load((root / "spec.yaml").read_text())) == spec
    # the stored weights, loaded into a fresh model, reproduce the reported validation accuracy
    bundle = load(spec.data)
    model, info = load_trained_model(root)
    assert info["epoch"] == spec.train.epochs and info["data"]["num_classes"] == 10
    with torch.no_grad():
        preds = model(torch.as_tensor(bundle.val.x)).argmax(-1).numpy()
    assert (preds == bundle.val.y).mean() == pytest.approx(outcome.final["val_accuracy"], abs=1e-9)


def test_cli_reports_an_already_complete_run(demo):
    spec, outcome = demo
    result = CliRunner().invoke(app, ["run", str(JOBS / "digits_cnn.yaml"), "--set",
                                      f"output.dir={outcome.store.root.parent}"])
    assert result.exit_code == 0, result.output
    assert "already holds all" in result.output and "model.safetensors" in result.output


def test_data_parallel_degree_2_matches_degree_1_step_for_step(ray_local, tmp_path):
    losses, weights = {}, {}
    for degree in (1, 2):
        raw = spec_dict(tmp_path, name=f"dp{degree}", parallelism={"data": degree},
                        train={"epochs": 2, "batch_size": 64, "optimizer": {"name": "adam", "lr": 2e-3}, "seed": 0})
        outcome = run(parse_spec(raw), num_cpus=RAY_CPUS)
        losses[degree] = np.concatenate([r["step_losses"] for r in outcome.history])
        weights[degree] = load_file(outcome.store.root / "model.safetensors")
    assert len(losses[1]) == len(losses[2]) >= 40
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-5)


def train_worker_pids() -> list[int]:
    """This session's rank processes (children of the raylet this test process started)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("ray::Rank"):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def kill_a_worker_after_checkpoint(store_root: Path, name: str, timeout: float = 240) -> str:
    """Wait for the checkpoint `name` (epoch-0002, or epoch-0001+0000100: 100 batches into the 2nd epoch),
    then SIGKILL one training worker process; returns the name of the newest checkpoint at the kill."""
    deadline = time.time() + timeout
    ckpt = store_root / "checkpoints" / name
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    assert ckpt.exists(), "the run never reached the checkpoint"
    pids = train_worker_pids()
    assert pids, "no rank process found"
    psutil.Process(pids[-1]).kill()
    return max(p.name for p in (store_root / "checkpoints").glob("epoch-*"))


def slow_cnn_spec(tmp_path, name, max_failures, **sections):
    """Small batches make each epoch last long enough (about a second) for a kill to land mid-run."""
    return parse_spec(spec_dict(
        tmp_path, name=name, model={"kind": "cnn", "channels": [16, 32]}, parallelism={"data": 2},
        train={"epochs": 8, "batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": 0},
        failure={"max_failures": max_failures}, **{"checkpoint": {"every_epochs": 1, "keep": 3}, **sections}))


def uninterrupted(spec, tmp_path) -> np.ndarray:
    """The step losses of `spec` trained to the end without a stop, in the same layout (local processes)."""
    from multiproc import run_local
    from raybig.train.checkpoint import RunStore

    run_local(spec.model_dump(mode="json"), tmp_path / "uninterrupted")
    return np.concatenate([r["step_losses"] for r in RunStore(tmp_path / "uninterrupted").history()])


def run_in_thread(spec):
    box = {}

    def target():
        try:
            box["outcome"] = run(spec, num_cpus=RAY_CPUS)
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_interrupted_run_resumes_after_its_last_checkpoint(ray_local, tmp_path):
    spec = slow_cnn_spec(tmp_path, "resume", max_failures=0)
    root = Path(spec.output.dir) / spec.name
    thread, box = run_in_thread(spec)
    kill_a_worker_after_checkpoint(root, "epoch-0002")
    thread.join(timeout=240)
    assert isinstance(box.get("error"), RunFailed)  # no failures allowed: the run stops
    done = max(int(p.name.split("-")[1]) for p in (root / "checkpoints").glob("epoch-*"))
    assert 2 <= done < spec.train.epochs
    first_attempt = {r["attempt"] for r in __import__("json").loads((root / "metrics.json").read_text())}

    outcome = run(spec, num_cpus=RAY_CPUS)  # the same spec again
    epochs = [r["epoch"] for r in outcome.history]
    assert outcome.resumed_from == done
    assert epochs == list(range(1, spec.train.epochs + 1))
    resumed = [r for r in outcome.history if r["attempt"] not in first_attempt]
    assert [r["epoch"] for r in resumed] == list(range(done + 1, spec.train.epochs + 1))


def test_killed_worker_is_replaced_and_training_resumes_at_the_next_batch(ray_local, tmp_path):
    spec = slow_cnn_spec(tmp_path, "failover", max_failures=1, checkpoint={"every_steps": 100, "keep": 2})
    root = Path(spec.output.dir) / spec.name
    thread, box = run_in_thread(spec)
    at_kill = kill_a_worker_after_checkpoint(root, "epoch-0001+0000021")  # 179 batches an epoch: step 200
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    history = box["outcome"].history
    assert [r["epoch"] for r in history] == list(range(1, spec.train.epochs + 1))
    attempts = [r["attempt"] for r in history]
    assert len(set(attempts)) == 2  # a new worker group took over mid-epoch, from the newest checkpoint ...
    assert "+" in at_kill and attempts.index(attempts[-1]) == int(at_kill[6:10])
    # ... at the very next batch: every step once, each with the loss of a run that was never stopped
    losses = np.concatenate([r["step_losses"] for r in history])
    np.testing.assert_allclose(losses, uninterrupted(spec, tmp_path), rtol=1e-6)


def test_streaming_loader_trains_an_lstm_on_ray_data_shards(ray_local, tmp_path):
    raw = spec_dict(tmp_path, name="stream", model={"kind": "lstm", "hidden": 32},
                    data={"source": "digits", "loader": "stream"}, parallelism={"data": 2},
                    train={"epochs": 3, "batch_size": 32, "optimizer": {"name": "adam", "lr": 5e-3}, "seed": 0})
    outcome = run(parse_spec(raw), num_cpus=RAY_CPUS)
    rows = len(load(parse_spec(raw).data).train)
    assert all(len(r["step_losses"]) == (rows // 2) // 16 for r in outcome.history)  # each rank: its half
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]
    assert outcome.final["val_accuracy"] > 0.3


def test_data2_x_pipeline2_job_survives_a_killed_worker_mid_epoch(ray_local, tmp_path):
    spec = load_spec(JOBS / "digits_pipeline.yaml", [f"output.dir={tmp_path}", "train.epochs=6", "train.batch_size=16",
                                                     "checkpoint.every_steps=40"])
    assert spec.parallelism.workers == 4 and spec.failure.max_failures >= 1
    root = Path(spec.output.dir) / spec.name
    thread, box = run_in_thread(spec)
    kill_a_worker_after_checkpoint(root, "epoch-0001+0000031")  # 89 batches an epoch: step 120
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    history = box["outcome"].history
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert len({r["attempt"] for r in history}) == 2
    assert history[-1]["val_accuracy"] > 0.9
    np.testing.assert_allclose(np.concatenate([r["step_losses"] for r in history]), uninterrupted(spec, tmp_path),
                               rtol=1e-6)
    model, info = load_trained_model(root)  # the stages came back as one model
    assert len(model.blocks) == 4 and info["epoch"] == 6


def test_char_lm_pipeline_job_learns(ray_local, tmp_path):
    spec = load_spec(JOBS / "charlm_pipeline.yaml", [f"output.dir={tmp_path}"])
    assert spec.parallelism.pipeline.stages == 2
    history = run(spec, num_cpus=RAY_CPUS).history
    first_steps = np.mean(history[0]["step_losses"][:5])
    assert history[-1]["train_loss"] < 0.6 * first_steps
    assert history[-1]["val_loss"] < 0.6 * first_steps
