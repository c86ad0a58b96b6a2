"""The job spec: strict parsing, field paths in errors, overrides, and the CLI's exit codes. No Ray here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raybig.errors import SpecError
from raybig.spec import OPTIMIZERS, apply_overrides, json_schema, load_spec, parse_spec

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def problems(raw):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return info.value.problems


def base(**over):
    raw = {"name": "x", "model": {"kind": "mlp"}, "data": {"source": "digits"}}
    raw.update(over)
    return raw


def test_every_shipped_job_parses():
    for path in JOBS.glob("*.yaml"):
        spec = load_spec(path)
        assert spec.name and spec.train.epochs >= 1


def test_defaults_fill_a_minimal_spec():
    spec = parse_spec(base())
    assert spec.train.optimizer.name == "adamw" and spec.parallelism.data == 1 and spec.checkpoint.keep == 2


def test_unknown_field_names_its_path():
    assert problems(base(model={"kind": "cnn", "chanels": [8]})) == [("model.chanels", "unknown field")]


def test_tagged_union_paths_do_not_include_the_tag():
    [(path, msg)] = problems(base(train={"optimizer": {"name": "adam", "lr": -1}}))
    assert path == "train.optimizer.lr" and "greater than 0" in msg and "-1" in msg


def test_unknown_optimizer_lists_the_known_ones():
    [(path, msg)] = problems(base(train={"optimizer": {"name": "lbfgs"}}))
    assert path == "train.optimizer.name"
    assert all(name in msg for name in OPTIMIZERS)


def test_each_optimizer_has_its_own_settings():
    spec = parse_spec(base(train={"optimizer": {"name": "momentum", "lr": 0.1, "momentum": 0.8, "nesterov": True}}))
    assert spec.train.optimizer.momentum == 0.8
    assert problems(base(train={"optimizer": {"name": "sgd", "momentum": 0.9}})) == [
        ("train.optimizer.momentum", "unknown field")]


def test_cross_field_errors():
    assert problems(base(train={"batch_size": 63}, parallelism={"data": 2}))[0][0] == "train.batch_size"
    [(path, msg)] = problems(base(train={"loss": "mse"}))
    assert path == "train.loss" and "one_hot" in msg
    assert parse_spec(base(train={"loss": "mse"}, data={"source": "digits", "one_hot": True})).train.loss == "mse"
    assert problems(base(model={"kind": "transformer", "task": "lm"}))[0][0] == "data.source"
    assert problems(base(model={"kind": "transformer", "dim": 30, "heads": 4}))[0][0] == "model"


def test_overrides_use_the_same_paths_and_parse_values():
    raw = apply_overrides(base(), ["train.epochs=3", "parallelism.data=2", "train.optimizer.name=sgd",
                                   "model.hidden=[32, 16]"])
    spec = parse_spec(raw)
    assert (spec.train.epochs, spec.parallelism.data, spec.train.optimizer.name, spec.model.hidden) == (3, 2, "sgd", [32, 16])
    assert problems(apply_overrides(base(), ["train.epochs=ten"]))[0][0] == "train.epochs"
    with pytest.raises(SpecError):
        apply_overrides(base(), ["train.epochs"])


def test_json_schema_describes_the_spec():
    schema = json.loads(json_schema())
    assert set(schema["required"]) == {"name", "model", "data"}
    assert "parallelism" in schema["properties"] and schema["additionalProperties"] is False


BAD_SPECS = {
    "unknown field": ("name: x\nmodel: {kind: cnn, chanels: [8]}\ndata: {source: digits}\n", "model.chanels"),
    "wrong type": ("name: x\nmodel: {kind: mlp}\ndata: {source: digits}\ntrain: {epochs: ten}\n", "train.epochs"),
    "negative lr": ("name: x\nmodel: {kind: mlp}\ndata: {source: digits}\ntrain: {optimizer: {name: sgd, lr: -0.1}}\n",
                    "train.optimizer.lr"),
    "unknown optimizer": ("name: x\nmodel: {kind: mlp}\ndata: {source: digits}\ntrain: {optimizer: {name: lbfgs}}\n",
                          "train.optimizer.name"),
    "zero degree": ("name: x\nmodel: {kind: mlp}\ndata: {source: digits}\nparallelism: {data: 0}\n", "parallelism.data"),
    "impossible degree": ("name: x\nmodel: {kind: mlp}\ndata: {source: digits}\ntrain: {batch_size: 512}\n"
                          "parallelism: {data: 512}\n", "parallelism.data"),
    "missing data file": ("name: x\nmodel: {kind: mlp}\ndata: {source: parquet, path: /nonexistent/d.parquet}\n",
                          "data.path"),
    "invalid yaml": ("name: x\nmodel: {kind: mlp\n", "invalid YAML"),
    "empty file": ("", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_spec_exits_2_with_one_clear_message(tmp_path, case, command):
    text, expected = BAD_SPECS[case]
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "raybig", command, str(spec)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_validate_accepts_a_good_spec(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raybig", "validate", str(JOBS / "digits_cnn.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok")


def test_set_errors_name_the_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raybig", "validate", str(JOBS / "digits_mlp.yaml"),
                           "--set", "train.batch_size=zero"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr


def test_resolved_spec_round_trips():
    spec = load_spec(JOBS / "digits_cnn.yaml")
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec


def test_the_spec_reference_in_docs_is_current():
    from raybig.specdoc import render

    docs = Path(__file__).resolve().parents[1] / "docs" / "spec.md"
    assert docs.read_text().strip() == render().strip(), "regenerate: python -m raybig.specdoc > docs/spec.md"
