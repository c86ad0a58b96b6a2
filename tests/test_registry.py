"""Tracking and the model registry against a real MLflow: a tracking server on loopback, and the local store."""
import json
import os
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import RAY_CPUS, spec_dict
from multiproc import free_port
from typer.testing import CliRunner

from raybig.cli import app
from raybig.procs import end_group, start_group
from raybig.spec import parse_spec
from raybig.train.checkpoint import load_trained_model
from raybig.train.runner import run


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` in a process group of its own, its artifacts proxied (mlflow-artifacts:/)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    state = tmp / "server.json"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts")]
    proc, _ = start_group(cmd, state, dict(os.environ), {})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        end_group(state)


def _written(tmp_path, raw: dict):
    import yaml

    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tracked(monkeypatch):
    monkeypatch.delenv("RAYBIG_TRACKING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_run_is_tracked_registered_promoted_and_served_from_the_registry(ray_local, tracked, tracking_server,
                                                                          tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from ray import serve

    from raybig.data.datasets import load
    from raybig.lifecycle.compress import compress
    from raybig.lifecycle.registry import RECORD, served_arg
    from raybig.serve.app import entry_from_arg, start

    raw = spec_dict(tmp_path, name="digits", tracking={"uri": tracking_server})
    outcome = run(parse_spec(raw), num_cpus=RAY_CPUS)
    record = json.loads((outcome.store.root / RECORD).read_text())
    mlflow = MlflowClient(tracking_server)
    tracked_run = mlflow.get_run(record["run_id"])
    assert tracked_run.data.params["model.kind"] == "mlp" and tracked_run.data.params["train.epochs"] == "2"
    history = mlflow.get_metric_history(record["run_id"], "val_accuracy")
    assert [m.value for m in history] == [r["val_accuracy"] for r in outcome.history] and len(history) == 2
    assert {a.path for a in mlflow.list_artifacts(record["run_id"], "model")} >= \
        {"model/model.safetensors", "model/model.json", "model/spec.yaml"}

    compress(outcome.store.root, tmp_path / "runs" / "digits-int8", "quantize")  # tracked as its spec says
    int8_record = json.loads((tmp_path / "runs" / "digits-int8" / RECORD).read_text())
    assert mlflow.get_run(int8_record["run_id"]).data.tags["raybig.compressed_from"] == str(outcome.store.root.resolve())

    cli, uri = CliRunner(), ["--tracking-uri", tracking_server]
    for args, words in ((["register", str(outcome.store.root), "digits", "--alias", "champion"], "models:/digits/1"),
                        (["register", str(tmp_path / "runs" / "digits-int8"), "digits"], "models:/digits/2"),
                        (["promote", "digits", "2"], "models:/digits@champion -> version 2")):
        result = cli.invoke(app, [*args, *uri])
        assert result.exit_code == 0 and words in result.output, result.output
    assert mlflow.get_model_version_by_alias("digits", "champion").version == "2"
    bad = cli.invoke(app, ["promote", "digits", "7", *uri])
    assert bad.exit_code == 2 and "no version 7" in bad.output

    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))  # the version is fetched there, from the server
    arg = served_arg("models:/digits@champion", tracking_server)
    assert arg.startswith("digits:v2=") and str(tmp_path / "cache") in arg
    url = start([entry_from_arg(arg)], "127.0.0.1", free_port())
    try:
        x = load(parse_spec(raw).data).val.x[:8]
        request = urllib.request.Request(f"{url}/v1/models/digits/predict", data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
    finally:
        serve.shutdown()
    assert answer["version"] == "v2"
    model, info = load_trained_model(tmp_path / "runs" / "digits-int8")
    assert info["compression"]["method"] == "quantize"
    with torch.no_grad():
        expected = torch.softmax(model(torch.as_tensor(x)), -1).numpy()
    np.testing.assert_allclose([p["probabilities"] for p in answer["predictions"]], expected, atol=2e-6)

    # a registered version to fine-tune from, and another to distil from: fetched before anything starts
    student = spec_dict(tmp_path, name="student", model={"kind": "mlp", "hidden": [64]},
                        init_from={"source": "models:/digits/1"}, distill={"teacher": "models:/digits@champion"},
                        train={"max_steps": 5, "batch_size": 64, "seed": 0}, eval={"every_steps": 5},
                        checkpoint={"every_steps": 5}, tracking={"uri": tracking_server})
    tuned = run(parse_spec(student), num_cpus=RAY_CPUS)
    cache = tmp_path / "cache" / "registry"
    assert tuned.final["step"] == 5
    lineage_of = json.loads((tuned.store.root / "model.json").read_text())["lineage"]
    assert lineage_of["init_from"].startswith(str(cache)) and lineage_of["init_from"].endswith("digits/1")
    assert lineage_of["teacher"].startswith(str(cache)) and lineage_of["teacher"].endswith("digits/2")
    missing = cli.invoke(app, ["validate", str(_written(tmp_path, {**student, "init_from": {"source": "models:/nope/1"}}))])
    assert missing.exit_code == 2 and "init_from.source" in missing.output and "not in the registry" in missing.output

    shown = cli.invoke(app, ["lineage", "models:/digits@champion", *uri])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "digits version 2 (aliases: champion)" in lines[0]
    assert any("compressed from" in line for line in lines)
    assert any(str(outcome.store.root.resolve()) in line and "mlp" in line for line in lines)
    every = cli.invoke(app, ["lineage", "digits", *uri])  # the name alone: each version, newest first
    headers = [line for line in every.output.splitlines() if line.startswith("models:/")]
    assert every.exit_code == 0 and [h.split(" = ")[0] for h in headers] == ["models:/digits/2", "models:/digits/1"]


def test_runs_sweeps_and_fine_tunes_are_tracked_in_the_local_store_with_their_parents(ray_local, tracked, tmp_path):
    from mlflow import MlflowClient

    from raybig.lifecycle.registry import local_uri
    from raybig.sweep.driver import run_sweep

    base = spec_dict(tmp_path, name="base", train={"epochs": 1, "batch_size": 64, "seed": 0})
    run(parse_spec(base), num_cpus=RAY_CPUS)
    sweep = spec_dict(tmp_path, name="tuned", init_from={"source": "base"},
                      train={"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 2e-3}},
                      sweep={"space": {"init_from.pretrained_lr_scale": {"grid": [0.1, 1.0]}}, "searcher": "grid"})
    outcome = run_sweep(parse_spec(sweep), num_cpus=RAY_CPUS)
    assert outcome.best is not None
    store = local_uri(tmp_path / "runs")  # no uri anywhere: a SQLite file beside the runs
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    mlflow = MlflowClient(store)
    runs = {r.info.run_name: r for r in mlflow.search_runs(mlflow.get_experiment_by_name("raybig").experiment_id)}
    sweep_run = runs["tuned sweep"]
    trials = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(trials) == 2 and {t.data.params["init_from.pretrained_lr_scale"] for t in trials} == {"0.1", "1.0"}
    best = mlflow.get_run(sweep_run.data.tags["raybig.best_run"])
    assert best.data.tags["raybig.init_from"] == str((tmp_path / "runs" / "base").resolve())
    assert best.data.tags["raybig.sweep"] == str(outcome.sweep_dir.resolve())
    shown = CliRunner().invoke(app, ["lineage", str(tmp_path / "runs" / "tuned")])
    assert shown.exit_code == 0, shown.output
    assert "fine-tuned from:" in shown.output and "best trial of the sweep:" in shown.output
    assert str((tmp_path / "runs" / "base").resolve()) in shown.output
