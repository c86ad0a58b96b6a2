"""Sweeps on a real local Ray started without a dashboard: every trial a full run on its own ranks, ASHA,
PBT, a trial the cluster cannot hold, the best model registered as a normal run and served over real HTTP,
and nothing of any trial left holding resources (an interrupted sweep resumed: tests/faults/)."""
import json
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import RAY_CPUS
from raybig.data.datasets import load
from raybig.spec import load_spec, parse_spec
from raybig.train.checkpoint import RunStore, load_trained_model

JOBS = Path(__file__).resolve().parents[1] / "jobs"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


# ----------------------------------------------------------------------------- the shipped sweep, with ASHA
def held_after_sweep(within_s: float = 30.0) -> dict:
    """What is still reserved once a sweep has returned: placement groups not REMOVED, CPUs not free. Ray
    removes a group asynchronously, so this waits for the state to settle, up to `within_s`."""
    import ray

    deadline = time.monotonic() + within_s
    while True:
        live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        taken = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
        if (not live and taken == 0) or time.monotonic() > deadline:
            return {"placement_groups": live, "cpus_taken": taken}
        time.sleep(0.5)


@pytest.fixture(scope="module")
def digits_sweep(ray_local, tmp_path_factory):
    from rich.console import Console

    from raybig.sweep.driver import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    # one trial at a time: ASHA then sees the trials arrive at its rungs in the same order on every run, so
    # which ones it stops does not depend on how busy the machine is
    # (and 8 of its 10 trials, to keep the suite short)
    spec = load_spec(JOBS / "digits_sweep.yaml", [f"output.dir={out}", "sweep.max_concurrent=1", "sweep.trials=8"])
    outcome = run_sweep(spec, num_cpus=RAY_CPUS, console=Console(stderr=True, width=160))
    return spec, outcome, held_after_sweep()


def test_asha_sweep_finishes_its_trials_and_stops_some_early(digits_sweep):
    spec, outcome, _ = digits_sweep
    assert not outcome.interrupted
    rows = outcome.rows
    assert len(rows) == spec.sweep.num_trials >= 8
    finished = [r for r in rows if r["status"] in ("completed", "stopped")]
    assert len(finished) >= 8, rows
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and all(r["epochs"] < spec.train.epochs for r in stopped)
    assert any(r["status"] == "completed" and r["epochs"] == spec.train.epochs for r in rows)
    assert len({r["train.optimizer.name"] for r in rows}) >= 3  # the optimizers really vary


def test_asha_stops_trials_at_its_rungs_and_later_trials_reuse_their_ranks(digits_sweep):
    """A trial's ranks wait for Tune's word at ASHA's rungs, so a stopped trial trained exactly to a rung
    (not on into the next epoch), and its rank processes went on to run later trials."""
    from raybig.sweep.driver import gate_epochs

    spec, outcome, _ = digits_sweep
    rungs = gate_epochs(spec.sweep, spec.train.epochs)
    assert rungs == [2, 4, 8]
    trials = {}
    for row in outcome.rows:
        root = outcome.sweep_dir / "trials" / f"{spec.name}-{row['trial']}"
        trained = [h["epoch"] for h in json.loads((root / "metrics.json").read_text())]
        profile = json.loads((root / "startup.json").read_text())
        trials[row["trial"]] = (row, trained, profile)
    for row, trained, _ in trials.values():
        if row["status"] == "stopped":
            assert trained[-1] in rungs and trained[-1] == row["epochs"], (row, trained)
    order = sorted(trials.values(), key=lambda t: t[2]["started_at"])
    stopped_pids = {t[2]["rank0_pid"] for t in order if t[0]["status"] == "stopped"}
    later = [t for i, t in enumerate(order) if t[2]["rank0_pid"] in {o[2]["rank0_pid"] for o in order[:i]}]
    assert later, [t[2] for t in order]  # some trial ran on ranks an earlier trial started
    assert stopped_pids & {t[2]["rank0_pid"] for t in later}  # ... among them, ranks of a stopped trial


def test_results_table_and_plots(digits_sweep):
    spec, outcome, _ = digits_sweep
    table = pd.read_parquet(outcome.sweep_dir / "results.parquet")
    assert sorted(table.trial) == sorted(r["trial"] for r in outcome.rows)
    for column in ("status", "reason", "epochs", "val_accuracy", *spec.sweep.space):
        assert column in table.columns
    assert (pd.read_csv(outcome.sweep_dir / "results.csv").epochs == table.epochs).all()
    plots = sorted(p.name for p in (outcome.sweep_dir / "plots").glob("*.png"))
    assert "val_accuracy_per_epoch.png" in plots
    assert {f"val_accuracy_vs_{p}.png" for p in spec.sweep.space} <= set(plots)
    # each trial is a full run of its own, with its sampled values in its resolved spec
    row = outcome.rows[0]
    trial_spec = parse_spec(yaml.safe_load(
        (outcome.sweep_dir / "trials" / f"{spec.name}-{row['trial']}" / "spec.yaml").read_text()))
    assert trial_spec.train.optimizer.name == row["train.optimizer.name"]
    assert trial_spec.train.optimizer.lr == pytest.approx(row["train.optimizer.lr"])
    assert trial_spec.parallelism.data == spec.parallelism.data == 2


def test_the_best_model_reaches_95_percent_and_is_a_normal_run(digits_sweep):
    spec, outcome, _ = digits_sweep
    best = outcome.best
    assert best is not None and best["val_accuracy"] >= 0.95
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in outcome.rows if r["status"] != "failed")
    stored = parse_spec(yaml.safe_load((outcome.root / "spec.yaml").read_text()))
    assert stored.name == spec.name and stored.sweep is None
    assert stored.train.optimizer.name == best["train.optimizer.name"]
    model, info = load_trained_model(outcome.root)
    assert info["name"] == spec.name and info["epoch"] == best["epochs"]
    bundle = load(spec.data)
    with torch.no_grad():
        accuracy = (model(torch.as_tensor(bundle.val.x)).argmax(-1).numpy() == bundle.val.y).mean()
    assert accuracy == pytest.approx(best["val_accuracy"], abs=1e-9)


def test_raybig_serve_takes_the_best_model_as_it_is(digits_sweep):
    from ray import serve

    from raybig.serve.app import entry_from_arg, start

    spec, outcome, _ = digits_sweep
    entry = entry_from_arg(str(outcome.root))
    assert entry.name == spec.name
    url = start([entry], "127.0.0.1", 8433)
    try:
        x = load(spec.data).val.x[:8]
        request = urllib.request.Request(f"{url}/v1/models/{spec.name}/predict",
                                         data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            got = [p["label"] for p in json.loads(reply.read())["predictions"]]
    finally:
        serve.shutdown()
    model, _ = load_trained_model(outcome.root)
    with torch.no_grad():
        assert got == model(torch.as_tensor(x)).argmax(-1).tolist()


# ----------------------------------------------------------------------------- PBT and the Bayesian searcher
def quick_sweep(tmp_path, name, epochs, batch_size=64, **sweep):
    return parse_spec({
        "name": name, "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits"},
        "train": {"epochs": epochs, "batch_size": batch_size, "optimizer": {"name": "sgd", "lr": 0.05}, "seed": 0},
        "output": {"dir": str(tmp_path / "runs")}, "sweep": sweep})


@pytest.fixture(scope="module")
def pbt_sweep(digits_sweep, tmp_path_factory):
    """Run after the ASHA sweep, in the same Ray: the stress test below checks what each leaves behind."""
    from raybig.sweep.driver import run_sweep

    # synchronous PBT (the default) exploits once every trial has reached the interval, so the population
    # meets at every epoch however the machine schedules the trials; 4 at a time or 2, the same decisions
    spec = quick_sweep(tmp_path_factory.mktemp("pbt"), "pbt", 3, batch_size=8, trials=4, max_concurrent=4, seed=1,
                       scheduler={"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5},
                       space={"train.optimizer.lr": {"loguniform": [1e-4, 0.3]},
                              "train.regularization.l2": {"loguniform": [1e-6, 1e-3]}})
    outcome = run_sweep(spec, num_cpus=RAY_CPUS)
    return spec, outcome, held_after_sweep()


def test_pbt_continues_weak_trials_from_strong_trials_checkpoints(pbt_sweep):
    spec, outcome, _ = pbt_sweep
    rows = {r["trial"]: r for r in outcome.rows}
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows.values()), rows
    exploited = [r for r in rows.values() if r["restored_from"] and not r["restored_from"].startswith(
        f"pbt-{r['trial']}@")]
    assert exploited, rows  # some trial went on from another trial's weights
    for row in exploited:  # ... with its own (perturbed) hyperparameters, inside the space's range
        trial_spec = parse_spec(yaml.safe_load(
            (outcome.sweep_dir / "trials" / f"pbt-{row['trial']}" / "spec.yaml").read_text()))
        assert 1e-4 <= trial_spec.train.optimizer.lr <= 0.3
        history = json.loads((outcome.sweep_dir / "trials" / f"pbt-{row['trial']}" / "metrics.json").read_text())
        assert [h["epoch"] for h in history] == list(range(1, spec.train.epochs + 1))
    for result_file in (outcome.sweep_dir / "tune").glob("*/result.json"):  # every epoch reached Tune with its weights
        reported = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert reported and all(r["checkpoint_dir_name"] for r in reported), result_file
    for trial in (outcome.sweep_dir / "trials").iterdir():  # ... and then left the trial's store
        assert len(RunStore(trial).checkpoint_dirs()) <= spec.checkpoint.keep, trial
    assert outcome.best is not None and (outcome.root / "model.safetensors").is_file()


def test_asha_then_pbt_in_one_ray_without_a_dashboard_leave_no_resources_held(digits_sweep, pbt_sweep):
    from ray._private.worker import global_worker

    assert not global_worker.node.address_info.get("webui_url")  # no dashboard, hence no state API to lean on
    for name, (_, outcome, held) in {"asha": digits_sweep, "pbt": pbt_sweep}.items():
        assert not outcome.interrupted, name
        assert held == {"placement_groups": [], "cpus_taken": 0}, (name, held)
    # stopped, paused and finished trials all happened: ASHA stopped some, PBT paused and restored some
    assert any(r["status"] == "stopped" for r in digits_sweep[1].rows)
    assert any(r["restored_from"] for r in pbt_sweep[1].rows)


def test_a_trial_the_cluster_cannot_hold_fails_with_its_reason_and_the_sweep_goes_on(ray_local, tmp_path):
    from raybig.sweep.driver import run_sweep

    # this Ray has no GPU: the second trial's layout can never be scheduled, and must not be waited for
    spec = quick_sweep(tmp_path, "nogpu", 1, searcher="grid", max_concurrent=2,
                       space={"resources.gpus_per_worker": {"grid": [0, 1]}})
    outcome = run_sweep(spec, num_cpus=RAY_CPUS)
    assert not outcome.interrupted
    rows = {r["resources.gpus_per_worker"]: r for r in outcome.rows}
    assert rows[0]["status"] == "completed" and rows[0]["epochs"] == 1
    assert rows[1]["status"] == "failed" and "GPU" in rows[1]["reason"] and "cluster has" in rows[1]["reason"], rows[1]
    assert outcome.best["trial"] == rows[0]["trial"]
    assert held_after_sweep() == {"placement_groups": [], "cpus_taken": 0}


def test_a_trial_of_streamed_data_whose_rank_dies_goes_on_from_its_last_checkpoint(ray_local, tmp_path,
                                                                                      monkeypatch):
    import psutil

    from raybig.data.shards import open_entry
    from raybig.sweep.driver import run_sweep

    # the sweep's cache is not the one this Ray's processes were started with: the trial must use the sweep's
    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))
    spec = parse_spec({
        "name": "failover", "model": {"kind": "cnn", "channels": [16, 32]},
        "data": {"source": "digits", "loader": "stream", "memory_mb": 1},
        # small batches: an epoch lasts about a second, long enough for the kill to land mid-run
        "train": {"epochs": 6, "batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": 0},
        "parallelism": {"data": 2}, "checkpoint": {"keep": 3}, "failure": {"max_failures": 1},
        "output": {"dir": str(tmp_path / "runs")},
        "sweep": {"searcher": "grid", "space": {"train.optimizer.lr": {"grid": [1e-3]}}}})
    box = {}
    thread = threading.Thread(target=lambda: box.update(outcome=run_sweep(spec, num_cpus=RAY_CPUS)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs").glob("failover/sweep/trials/*/checkpoints/epoch-0002")):
        assert time.monotonic() < deadline and thread.is_alive(), "the trial never reached its second checkpoint"
        time.sleep(0.05)
    ranks = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::Rank")]
    assert len(ranks) == 2, ranks
    ranks[-1].kill()
    thread.join(timeout=400)
    outcome = box["outcome"]
    (row,) = outcome.rows
    assert row["status"] == "completed" and row["epochs"] == spec.train.epochs, row
    trial_dir = next((tmp_path / "runs" / "failover" / "sweep" / "trials").iterdir())
    history = json.loads((trial_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, spec.train.epochs + 1))
    attempts = [h["attempt"] for h in history]
    assert len(set(attempts)) == 2 and attempts.index(attempts[-1]) >= 2  # a new group went on after epoch 2 or later
    (entry,) = (tmp_path / "cache" / "shards").glob("rows-*")  # the ranks streamed the split from its shards
    assert len(open_entry(entry)[0].shards) >= 3
    assert held_after_sweep() == {"placement_groups": [], "cpus_taken": 0}


def test_the_bayesian_searcher_runs_trials(ray_local, tmp_path):
    from raybig.sweep.driver import run_sweep

    spec = quick_sweep(tmp_path, "bayes", 1, trials=3, max_concurrent=2, searcher="optuna",
                       space={"train.optimizer.lr": {"loguniform": [1e-3, 0.3]},
                              "train.optimizer.name": {"choice": ["sgd", "adam"]}})
    outcome = run_sweep(spec, num_cpus=RAY_CPUS)
    assert len(outcome.rows) == 3 and all(r["status"] == "completed" for r in outcome.rows)
    assert len({r["train.optimizer.lr"] for r in outcome.rows}) == 3
    assert outcome.best["val_accuracy"] == max(r["val_accuracy"] for r in outcome.rows)
