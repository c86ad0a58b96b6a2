"""The process a user started, SIGKILLed mid-run (`kill -9`, the OOM killer, a closed laptop's shell): its
ranks end within seconds, nothing of Ray is left running, and the same command run again goes on from the
newest checkpoint, every epoch recorded once, ending with the weights of a run never stopped. For `raybig
run` on its own embedded Ray and on a warm one (`raybig up`), and for `raybig sweep ... --resume`."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import RAY_CPUS, processes_left
from injection import newest_checkpoint, slow_cnn_spec, uninterrupted
from raybig.train.checkpoint import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
TRIALS = ("ray::ImplicitFu", "ray::Rank")  # a trial's process (its name cut to 15 characters), its ranks
RAY_AGENTS_S = 90  # a SIGKILLed driver's embedded Ray: its two agents wait out a 60 s timeout of Ray's, then go


@pytest.fixture(scope="module")
def job(no_ray_in_this_process, tmp_path_factory):
    """A spec file of a two-rank run long enough to be killed mid-way, and the step losses of a run never stopped."""
    tmp = tmp_path_factory.mktemp("job")
    spec = slow_cnn_spec(tmp, "killed", max_failures=0, epochs=6)
    return spec, uninterrupted(spec, tmp)


def raybig(*args: str, mark: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raybig", *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**(env or os.environ), "RAYBIG_COMMAND_MARK": mark})


def sigkill_at(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "it never reached " + str(path)
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)  # reaped, as a shell does: a zombie would still answer to its pid


def killed_then_rerun(job, tmp_path, *, env=None, ranks_of: str = "") -> str:
    """`raybig run` SIGKILLed once its second epoch is checkpointed, its ranks checked gone, then the same
    command again: it resumes and ends as a run never stopped. Returns the first command's mark."""
    spec, reference = job
    spec_file = tmp_path / "killed.yaml"
    spec_file.write_text(spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(tmp_path)})})
                         .to_yaml())
    root = tmp_path / spec.name
    first, again = (f"{what}-{os.getpid()}-{time.time_ns()}" for what in ("killed", "rerun"))
    cpus = ["--num-cpus", str(RAY_CPUS)] if not ranks_of else []
    sigkill_at(raybig("run", str(spec_file), *cpus, mark=first, env=env), root / "checkpoints" / "epoch-0002")
    # the ranks are the warm Ray's processes there (they carry its mark), the run's own here
    assert processes_left(ranks_of or first, named="ray::Rank") == [], "the dead driver's ranks train on"
    at_rest = newest_checkpoint(root)
    assert processes_left(ranks_of or first, within_s=0, named="ray::Rank") == []
    assert newest_checkpoint(root) == at_rest < f"epoch-{spec.train.epochs:04d}"

    proc = raybig("run", str(spec_file), *cpus, mark=again, env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    done = int(at_rest.removeprefix("epoch-")[:4])
    assert f"({done} whole epochs)" in out, out  # it went on from the newest checkpoint ...
    history = RunStore(root).history()
    assert [r["epoch"] for r in history] == list(range(1, spec.train.epochs + 1))  # ... each epoch once ...
    assert len({r["attempt"] for r in history[done:]}) == 1 and history[done]["attempt"] != history[0]["attempt"]
    np.testing.assert_allclose(np.concatenate([r["step_losses"] for r in history]), reference, rtol=1e-6)
    assert processes_left(again) == []
    return first


# marks of drivers SIGKILLed on their own Ray, whose leftovers the last test of this module looks for: Ray's
# agents take up to RAY_AGENTS_S to end, which the tests in between spend instead of a wait
KILLED_ON_OWN_RAY: list[str] = []


def test_a_sigkilled_run_on_its_own_ray_leaves_nothing_and_the_same_command_resumes(job, tmp_path):
    first = killed_then_rerun(job, tmp_path)
    assert processes_left(first, within_s=0, named=("ray::Rank", "raylet", "gcs_server")) == []  # gone at once
    KILLED_ON_OWN_RAY.append(first)


def test_a_sigkilled_run_on_a_warm_ray_ends_its_ranks_there_and_the_same_command_resumes(job, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAYBIG_NO_WARM_RAY"}
    env["RAYBIG_CACHE"] = str(tmp_path / "cache")  # its own record of the warm Ray, whatever else runs here
    up_mark = f"up-{os.getpid()}-{time.time_ns()}"
    try:
        up = raybig("up", "--num-cpus", str(RAY_CPUS), mark=up_mark, env=env)
        out, _ = up.communicate(timeout=120)
        assert up.returncode == 0, out
        killed_then_rerun(job, tmp_path, env=env, ranks_of=up_mark)
        a_sweep_killed_on_the_warm_ray(tmp_path, env, up_mark)
        assert processes_left(up_mark, within_s=0)  # the warm Ray itself stayed up
    finally:
        down = raybig("down", mark=up_mark, env=env)
        out, _ = down.communicate(timeout=120)
    assert out.strip() == "down", out
    assert processes_left(up_mark) == []


def a_sweep_killed_on_the_warm_ray(tmp_path, env: dict, up_mark: str) -> None:
    """`raybig sweep` SIGKILLed mid-trial: its trial, a process of the warm Ray, ends there and trains no
    further epoch (it watches the sweep's driver, 5 times a second; an epoch here takes a second or two)."""
    raw = {"name": "long", "model": {"kind": "cnn", "channels": [16, 32]}, "data": {"source": "digits"},
           "train": {"epochs": 200, "batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": 0},
           "output": {"dir": str(tmp_path / "sweeps")},
           "sweep": {"searcher": "grid", "space": {"train.optimizer.lr": {"grid": [0.002]}}}}
    spec_file = tmp_path / "long.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    proc = raybig("sweep", str(spec_file), mark=f"sweep-{os.getpid()}-{time.time_ns()}", env=env)
    trials = tmp_path / "sweeps" / "long" / "sweep" / "trials"
    deadline = time.monotonic() + 240

    def epochs() -> int:
        found = list(trials.glob("*/metrics.json"))
        return len(json.loads(found[0].read_text())) if found else 0

    while epochs() < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.05)
    at_kill = epochs()
    proc.kill()
    proc.wait(timeout=30)
    assert processes_left(up_mark, named="ray::ImplicitFu") == [], "the dead sweep's trial trains on"
    assert epochs() <= at_kill + 1  # at most the epoch it was in


# ----------------------------------------------------------------------------- a sweep, stopped twice
def small_sweep(tmp_path) -> Path:
    """Four one-worker trials, one at a time; the second one's lr makes it diverge."""
    raw = {
        "name": "resumable",
        "model": {"kind": "mlp", "hidden": [64]},
        "data": {"source": "digits"},
        "train": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05}, "seed": 0},
        "output": {"dir": str(tmp_path / "runs")},
        "sweep": {"searcher": "grid", "max_concurrent": 1,
                  "space": {"train.optimizer.lr": {"grid": [0.05, 1.0e4, 0.1, 0.02]}}},
    }
    path = tmp_path / "resumable.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_process(*args, mark: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raybig", "sweep", *args, "--num-cpus", str(RAY_CPUS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAYBIG_COMMAND_MARK": mark})


def ended_trials(lines: list[str]) -> list[str]:
    return [line.split()[1] for line in lines
            if line.startswith("trial ") and (" finished:" in line or " failed:" in line)]


def stop_after_trials_end(spec_path: Path, trials: int, how: signal.Signals, *args: str) -> tuple[int, str, str]:
    """A sweep stopped by the signal `how` once `trials` trials ended in it: its exit code, output and mark."""
    mark = f"sweep-{os.getpid()}-{time.time_ns()}"
    proc = sweep_process(str(spec_path), *args, mark=mark)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 400
    while len(ended_trials(lines)) < trials and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert len(ended_trials(lines)) >= trials, "".join(lines)
    proc.send_signal(how)
    proc.wait(timeout=180)  # not communicate(): it would read stderr too, taking lines from under the reader
    reader.join(timeout=10)
    return proc.returncode, "".join(lines) + proc.stdout.read(), mark


def test_a_sweep_stopped_by_ctrl_c_then_sigkilled_resumes_without_rerunning_ended_trials(no_ray_in_this_process,
                                                                                          tmp_path):
    spec_path = small_sweep(tmp_path)
    sweep_dir = tmp_path / "runs" / "resumable" / "sweep"
    code, out, mark = stop_after_trials_end(spec_path, 1, signal.SIGINT)  # Ctrl-C, to the driver only
    assert code == 130 and "--resume" in out, out
    assert processes_left(mark) == []  # the interrupted sweep's Ray went with it, within 30 s

    again = sweep_process(str(spec_path))  # without --resume the existing sweep is protected
    assert again.wait(timeout=120) == 2 and "--resume" in again.stderr.read()

    ended = set(ended_trials(out.splitlines()))
    code, out, killed = stop_after_trials_end(spec_path, 1, signal.SIGKILL, "--resume")
    assert code == -signal.SIGKILL, out
    assert processes_left(killed, named=TRIALS) == []  # its trials (and their ranks) ended
    ended |= set(ended_trials(out.splitlines()))
    assert 2 <= len(ended) < 4, out
    trials = sweep_dir / "trials"
    stamps = {trial: (trials / f"resumable-{trial}" / "spec.yaml").stat().st_mtime_ns for trial in ended}

    resumed = sweep_process(str(spec_path), "--resume", mark=mark)
    out, err = resumed.communicate(timeout=500)
    assert resumed.returncode == 0, out + err
    assert processes_left(mark) == []
    KILLED_ON_OWN_RAY.append(killed)
    final = pd.read_csv(sweep_dir / "results.csv").set_index("trial")
    assert len(final) == 4  # the same four trials, none added
    for trial, stamp in stamps.items():  # those that ended before the kill were not run again
        assert (trials / f"resumable-{trial}" / "spec.yaml").stat().st_mtime_ns == stamp, trial
        assert final.loc[trial, "status"] in ("completed", "diverged")
    for trial in final.index:  # every trial's epochs recorded once (the diverging one has none)
        metrics = trials / f"resumable-{trial}" / "metrics.json"
        history = json.loads(metrics.read_text()) if metrics.is_file() else []
        epochs = [h["epoch"] for h in history]
        assert epochs == list(range(1, len(epochs) + 1)), (trial, epochs)

    # the diverging trial is recorded with its reason, and the sweep went on
    diverged = final[final["train.optimizer.lr"] == 1.0e4]
    assert list(diverged.status) == ["diverged"]
    assert "diverged" in diverged.reason.iloc[0] and "training loss" in diverged.reason.iloc[0]
    others = final[final["train.optimizer.lr"] != 1.0e4]
    assert list(others.status) == ["completed"] * 3 and (others.epochs == 3).all()
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial"] == others["val_accuracy"].idxmax()


def test_nothing_of_a_sigkilled_drivers_own_ray_is_left():
    if not KILLED_ON_OWN_RAY:
        pytest.skip("no driver was killed on its own Ray in this session")
    for mark in KILLED_ON_OWN_RAY:
        assert processes_left(mark, within_s=RAY_AGENTS_S) == []
