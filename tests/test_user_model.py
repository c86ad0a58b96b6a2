"""A model of the user's own (`model: {kind: python, factory: ...}`): written to a file by the test, checked
before anything starts, trained data-parallel on real Ray workers, served over real HTTP only when trusted."""
import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import RAY_CPUS
from raybig.cli import app
from raybig.data.datasets import load
from raybig.spec import load_spec

MODEL_FILE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Not one of raybig's: a stem, a list of residual layers, a head."""

    def __init__(self, inputs, classes, width, depth):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x.flatten(1)))
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def build(meta, width=32, depth=2):
    return TinyNet(int(torch.tensor(meta.shape).prod()), meta.num_classes, width, depth)


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(width, width), nn.GELU())

    def forward(self, h):
        return h + self.mix(h)


class LayeredNet(nn.Module):
    """Its forward is its children in order, so raybig can cut it into pipeline stages."""

    def __init__(self, inputs, classes, width, depth):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU())
        self.layers = nn.ModuleList(Residual(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def layered(meta, width=32, depth=2):
    return LayeredNet(int(torch.tensor(meta.shape).prod()), meta.num_classes, width, depth)


def not_a_module(meta):
    return "a string"


def raises(meta):
    raise RuntimeError("the factory's own failure")


def wrong_output(meta):
    return nn.Linear(64, 3)
'''


def write_job(directory: Path, model: dict, **sections) -> Path:
    spec = {"name": "mine", "model": model, "data": {"source": "digits"},
            "train": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "adam", "lr": 3e-3}, "seed": 0},
            "parallelism": {"data": 2}, "output": {"dir": str(directory / "runs")}, **sections}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's project: the model's module next to the job spec (the default place raybig looks)."""
    root = tmp_path_factory.mktemp("project")
    (root / "usernet.py").write_text(textwrap.dedent(MODEL_FILE))
    return root


def test_a_user_model_validates_and_its_code_is_found_beside_the_spec(project):
    job = write_job(project, {"kind": "python", "factory": "usernet:build", "args": {"width": 16}})
    assert load_spec(job).model.code == [str(project.resolve())]
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0, result.output
    assert "python on digits" in result.output


def test_model_args_are_sweepable_and_a_value_the_factory_refuses_stops_the_sweep_first(project, tmp_path):
    from raybig.spec import parse_spec
    from raybig.sweep.space import trial_spec

    model = {"kind": "python", "factory": "usernet:layered", "code": [str(project)]}
    raw = yaml.safe_load(write_job(tmp_path, model, sweep={"space": {"model.args.width": {"choice": [16, 32]}}})
                         .read_text())
    parse_spec(raw)
    assert trial_spec(raw, {"model.args.width": 32}, "t", str(tmp_path)).model.args == {"width": 32}
    job = write_job(tmp_path, model, sweep={"space": {"model.args.colour": {"choice": ["red"]}}})
    result = CliRunner().invoke(app, ["sweep", str(job)])
    assert result.exit_code == 2 and "sweep.space.model.args.colour" in result.output, result.output
    assert "unexpected keyword argument 'colour'" in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model, expected", [
    ({"factory": "nowhere:build"}, "cannot import nowhere"),
    ({"factory": "usernet:missing"}, "usernet has no attribute missing"),
    ({"factory": "usernet:not_a_module"}, "returned a str, not a torch.nn.Module"),
    ({"factory": "usernet:raises"}, "raised RuntimeError: the factory's own failure"),
    ({"factory": "usernet:wrong_output"}, "the module's forward failed"),
    ({"factory": "usernet:build", "args": {"colour": "red"}}, "unexpected keyword argument 'colour'"),
    ({"factory": "usernet"}, "String should match pattern"),
])
def test_a_broken_factory_is_refused_before_anything_starts(tmp_path, project, model, expected):
    job = write_job(tmp_path, {"kind": "python", "code": [str(project)], **model})
    result = CliRunner().invoke(app, ["run", str(job)])
    assert result.exit_code == 2, result.output
    assert "model.factory" in result.output and expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_pipeline_stages_of_a_module_whose_forward_is_not_its_children_in_order_are_refused(project, tmp_path):
    """TinyNet's forward flattens, applies relu and adds residuals between its children: cutting it there
    would train a different function, so raybig refuses, and still trains it data-parallel."""
    job = write_job(tmp_path, {"kind": "python", "factory": "usernet:build", "code": [str(project)]},
                    parallelism={"data": 1, "pipeline": {"stages": 2, "microbatches": 4}})
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 2 and "parallelism.pipeline.stages" in result.output, result.output
    assert "does more than call them in order" in result.output, result.output
    named = write_job(tmp_path, {"kind": "python", "factory": "usernet:layered", "code": [str(project)],
                                 "blocks": "nothing"}, parallelism={"data": 1, "pipeline": {"stages": 2, "microbatches": 4}})
    result = CliRunner().invoke(app, ["validate", str(named)])
    assert result.exit_code == 2 and "no child nn.ModuleList named 'nothing'" in result.output, result.output


def test_pipeline_stages_of_a_user_module_reproduce_one_process(project, tmp_path):
    """The parts found in the user's module (stem, each layer, head) are cut into stages: pipeline 2 and
    data 2 x pipeline 2 train the same steps as one process."""
    from multiproc import run_local

    model = {"kind": "python", "factory": "usernet:layered", "args": {"depth": 3}, "code": [str(project)]}
    runs = {}
    for name, parallelism in [("one", {"data": 1}), ("pp2", {"data": 1, "pipeline": {"stages": 2, "microbatches": 4}}),
                              ("dp2pp2", {"data": 2, "pipeline": {"stages": 2, "microbatches": 2}})]:
        (tmp_path / name).mkdir()
        spec = yaml.safe_load(write_job(tmp_path / name, model, parallelism=parallelism).read_text())
        spec["train"]["epochs"] = 1
        run_local(spec, tmp_path / name / "run")
        runs[name] = [loss for r in json.loads((tmp_path / name / "run" / "metrics.json").read_text())
                      for loss in r["step_losses"]]
    assert len(runs["one"]) >= 10
    for name in ("pp2", "dp2pp2"):
        torch.testing.assert_close(torch.tensor(runs[name]), torch.tensor(runs["one"]), rtol=1e-4, atol=0)
    result = CliRunner().invoke(app, ["validate", str(write_job(tmp_path, model, parallelism={
        "data": 1, "pipeline": {"stages": 2, "microbatches": 4}}))])
    assert result.exit_code == 0 and "[Sequential, Residual]" in result.output, result.output


@pytest.fixture(scope="module")
def trained(ray_local, project):
    from raybig.train.runner import run

    spec = load_spec(write_job(project, {"kind": "python", "factory": "usernet:layered", "args": {"width": 48}}))
    return spec, run(spec, num_cpus=RAY_CPUS)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_user_model_trains_data_parallel_and_is_served_only_when_trusted(trained):
    from ray import serve

    from raybig.serve.app import entry_from_arg, start
    from raybig.serve.client import post
    from raybig.train.checkpoint import load_trained_model

    spec, outcome = trained
    history = outcome.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and outcome.final["val_accuracy"] > 0.8  # chance is 0.1
    root = outcome.store.root
    info = json.loads((root / "model.json").read_text())
    assert info["kind"] == "python" and info["model"]["factory"] == "usernet:layered"
    assert info["model"]["args"] == {"width": 48}

    # user code runs only when the caller says so: the CLI refuses before starting Ray, naming the flag
    refused = CliRunner().invoke(app, ["serve", str(root)])
    assert refused.exit_code == 2 and "--trust-code" in refused.output, refused.output

    x = load(spec.data).val.x[:16]
    url = start([entry_from_arg(str(root), trust_code=True)], "127.0.0.1", 8431)
    try:
        got = [p["label"] for p in post(f"{url}/v1/models/{spec.name}/predict", {"inputs": x.tolist()})["predictions"]]
    finally:
        serve.shutdown()
    model, _ = load_trained_model(root, trust_code=True)
    with torch.no_grad():
        assert got == model(torch.as_tensor(x)).argmax(-1).tolist()
