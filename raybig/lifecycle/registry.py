"""Tracking and the model registry, with MLflow.

Each run is recorded when it ends (spec `tracking`): an MLflow run holding the resolved spec as parameters,
every record of metrics.json at its step, and artifacts: `model/` (the weights, model.json, spec.yaml and a
tokenizer where there is one: everything serving needs) and the curves. Its tags name the raybig run's
directory and its parents: the run it was fine-tuned from, its teacher, the run it was compressed from, the
sweep it won. The store is a tracking server when the spec or $MLFLOW_TRACKING_URI names one, else a
SQLite file beside the runs (output.dir/mlflow.db, artifacts in output.dir/mlflow-artifacts).

`raybig register RUN NAME` makes the run's model a version of NAME in MLflow's registry, `raybig promote`
moves an alias (champion) to a version, `raybig serve models:/NAME@champion` serves what an alias points at
(fetched into RAYBIG_CACHE), and `raybig lineage` prints the chain from a served version to the specs and
runs it came from.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from raybig.errors import SpecError

OFF = "RAYBIG_TRACKING"  # "off": no run is tracked (the test suite's default)
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlflow-artifacts"
RECORD = "tracking.json"  # in a run's directory: where it was tracked, and the weights it was tracked with
MODEL_FILES = ("model.safetensors", "model.json", "spec.yaml", "tokenizer.json")
PARENTS = {"init_from": "fine-tuned from", "teacher": "distilled from", "compressed_from": "compressed from",
           "sweep": "best trial of the sweep"}


def local_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / LOCAL_DB}"


def tracking_uri(spec) -> str | None:
    """Where `spec`'s runs are tracked; None when tracking is off or has nowhere local to go."""
    if not spec.tracking.enabled or os.environ.get(OFF, "").lower() in ("off", "0", "false"):
        return None
    uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return None if "://" in spec.output.dir else local_uri(spec.output.dir)


def client(uri: str):
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "creating initial tables" on every new store
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # beside the database, not in whatever directory the command runs from
        location = (Path(uri[len("sqlite:///"):]).parent / LOCAL_ARTIFACTS).as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _flat(tree, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in (tree or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, path + "."))
        elif value is not None:
            out[path] = (json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:6000]
    return out


def parents(info: dict) -> dict[str, str]:
    """The runs (or files) a model came from, as model.json records them."""
    out = dict(info.get("lineage") or {})
    if info.get("compression", {}).get("parent"):
        out["compressed_from"] = info["compression"]["parent"]
    return out


def track_run(run_dir: Path, uri: str, experiment: str = "raybig") -> str:
    """Record the run at `run_dir` as an MLflow run; returns its id (also written to run_dir/tracking.json)."""
    import yaml
    from mlflow.entities import Metric, Param

    run_dir = Path(run_dir).resolve()
    info = json.loads((run_dir / "model.json").read_text())
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text()) if (run_dir / "spec.yaml").is_file() else {}
    history = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else []
    c = client(uri)
    tags = {"raybig.run_dir": str(run_dir), "raybig.kind": info.get("kind", ""),
            **{f"raybig.{k}": str(v) for k, v in parents(info).items()}}
    if info.get("compression"):
        tags["raybig.compression"] = info["compression"]["method"]
    run = c.create_run(experiment_id(c, experiment, uri), run_name=info.get("name") or run_dir.name, tags=tags)
    rid = run.info.run_id
    params = [Param(k, v) for k, v in _flat(spec).items()]
    if info.get("compression"):
        params += [Param(f"compression.{k}", v) for k, v in _flat(info["compression"]).items()]
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(record.get("step", i)))
               for i, record in enumerate(history) for key, value in record.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step",)]
    for key, value in (info.get("metrics") or {}).items() if not history else ():  # a compressed run's
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.append(Metric(key, float(value), now, 0))
    for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
        c.log_batch(rid, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        c.log_batch(rid, metrics=metrics[i:i + 1000])
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            c.log_artifact(rid, str(run_dir / name), artifact_path="model")
    for name in ("curves.png", "compression.json", "compression.png"):
        if (run_dir / name).is_file():
            c.log_artifact(rid, str(run_dir / name))
    c.set_terminated(rid)
    (run_dir / RECORD).write_text(json.dumps({"uri": uri, "run_id": rid, "experiment": experiment,
                                              "model_sha256": _digest(run_dir / "model.safetensors")}, indent=1))
    return rid


class Tracker:
    """Tracks a run when it ends; MLflow's import (about 2 s) and the store's set-up happen on a thread while
    the run trains, so a tracked run ends no later than an untracked one."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self._ready = threading.Thread(target=self._prepare, name="raybig-tracking", daemon=True)
        self._ready.start()

    def _prepare(self) -> None:
        try:
            experiment_id(client(self.uri), self.experiment, self.uri)
        except Exception:  # unreachable now: finish() says so, when it tries again
            pass

    def finish(self, run_dir: Path, console=None) -> str | None:
        """Track the run; a tracking store that fails is reported, never fails the run (its model is saved)."""
        self._ready.join()
        try:
            rid = track_run(run_dir, self.uri, self.experiment)
        except Exception as err:
            if console is not None:
                from rich.markup import escape

                console.print(f"[yellow]tracking failed[/] ({escape(self.uri)}): {escape(str(err).splitlines()[0])}",
                              highlight=False)
            return None
        if console is not None:
            console.print(f"tracked: MLflow run {rid} ({self.uri})", highlight=False)
        return rid


def start_tracking(spec) -> Tracker | None:
    uri = tracking_uri(spec)
    return Tracker(uri, spec.tracking.experiment) if uri else None


# ----------------------------------------------------------------------------- the registry
def run_uri(run_dir: Path, uri: str | None) -> str:
    """The tracking store for commands about a run: given, the one it was tracked to, or the local default."""
    record = Path(run_dir) / RECORD
    if not uri and not os.environ.get("MLFLOW_TRACKING_URI") and record.is_file():
        return json.loads(record.read_text())["uri"]
    return store_uri(uri, Path(run_dir).resolve().parent)


def tracked_run_id(run_dir: Path, uri: str) -> str:
    """The MLflow run holding the run's current weights: the one recorded, or a new one."""
    record = Path(run_dir) / RECORD
    if record.is_file():
        seen = json.loads(record.read_text())
        if seen["uri"] == uri and seen["model_sha256"] == _digest(Path(run_dir) / "model.safetensors"):
            return seen["run_id"]
    return track_run(Path(run_dir), uri)


def register(run_dir: Path, name: str, uri: str, alias: str | None = None) -> int:
    """A new version of registered model `name` holding the run's model; returns the version number."""
    from mlflow.exceptions import MlflowException

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "model.json").is_file():
        raise SpecError(f"{run_dir} holds no trained model (no model.json)", "RUN")
    rid = tracked_run_id(run_dir, uri)
    c = client(uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="registered by raybig")
    info = json.loads((run_dir / "model.json").read_text())
    source = f"{c.get_run(rid).info.artifact_uri}/model"
    tags = {"raybig.run_dir": str(run_dir), **{f"raybig.{k}": str(v) for k, v in parents(info).items()}}
    version = c.create_model_version(name, source=source, run_id=rid, tags=tags,
                                     description=f"{info.get('kind')} run {run_dir.name}, epoch {info.get('epoch')}")
    if alias:
        c.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def promote(name: str, version: int, alias: str, uri: str) -> None:
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        raise SpecError(f"{name} has no version {version} in {uri}", "VERSION") from None
    c.set_registered_model_alias(name, alias, str(version))


def parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    body = ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    name, _, version = body.partition("/")
    if not name or not (version.isdigit() if version else False):
        raise SpecError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION", "models:/")
    return name, None, version


def model_version(ref: str, uri: str):
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(ref)
    c = client(uri)
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as err:
        raise SpecError(f"{ref} is not in the registry at {uri}: {str(err).splitlines()[0]}", "models:/") from None


def versions_of(name: str, uri: str) -> list[int]:
    """A registered model's version numbers, newest first (SpecError when it has none)."""
    numbers = sorted((int(v.version) for v in client(uri).search_model_versions(f"name = '{name}'")), reverse=True)
    if not numbers:
        raise SpecError(f"no registered model {name!r} in {uri}", "NAME")
    return numbers


def fetch(ref: str, uri: str) -> tuple[Path, str, int]:
    """The files of a registered version, as a run directory under RAYBIG_CACHE (fetched once per version):
    (directory, model name, version)."""
    import mlflow

    from raybig.data.datasets import cache_dir

    version = model_version(ref, uri)
    target = cache_dir() / "registry" / hashlib.sha256(uri.encode()).hexdigest()[:12] / version.name / version.version
    if not (target / "model.json").is_file():
        import shutil

        partial = target.with_name(f".{target.name}.{os.getpid()}")  # renamed into place whole
        mlflow.set_tracking_uri(uri)
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(partial)))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(fetched, target)
        shutil.rmtree(partial, ignore_errors=True)
    return target, version.name, int(version.version)


def store_uri(given: str | None = None, output_dir: str | Path = "runs") -> str:
    """The MLflow store a command works with, tracking on or off: the one given, else $MLFLOW_TRACKING_URI,
    else the local store beside the runs."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(output_dir)


def registry_uri(spec) -> str:
    """The registry a spec's models:/ references are looked up in."""
    return store_uri(spec.tracking.uri, spec.output.dir)


def resolve_registered(spec) -> None:
    """A registered version named by init_from.source or distill.teacher, fetched here and named by its local
    directory in the spec, so every rank (and the stored spec) reads those files."""
    for section, field in ((spec.init_from, "source"), (spec.distill, "teacher")):
        ref = getattr(section, field, None) if section is not None else None
        if not ref or not ref.startswith("models:/"):
            continue
        where = f"{'init_from' if section is spec.init_from else 'distill'}.{field}"
        try:
            path, _, _ = fetch(ref, registry_uri(spec))
        except SpecError as err:
            raise SpecError(err.problems[0][1], where) from None
        setattr(section, field, str(path))


def served_arg(arg: str, uri: str) -> str:
    """A `raybig serve` argument with a registered version (models:/...) made NAME:vVERSION=its fetched run."""
    if not arg.startswith("models:/"):
        return arg
    path, name, version = fetch(arg, uri)
    return f"{name}:v{version}={path}"


# ----------------------------------------------------------------------------- lineage
def _describe(run_dir: Path) -> str:
    info = json.loads((run_dir / "model.json").read_text())
    metrics = info.get("metrics") or {}
    figure = next((f"{k} {metrics[k]:.4g}" for k in ("val_accuracy", "val_perplexity", "val_mse") if k in metrics), "")
    labels = info.get("data", {}).get("labels")
    data = f"{info.get('data', {}).get('num_classes')} classes" + (f" ({', '.join(labels)})" if labels else "")
    bits = [f"{info.get('kind')}", data, f"epoch {info.get('epoch')}", figure]
    if info.get("compression"):
        bits.append(f"compressed: {info['compression']['method']}")
    return ", ".join(b for b in bits if b)


def lineage(run_dir: Path, depth: int = 0, seen: set | None = None) -> list[str]:
    """The run, its spec, and the chain of runs it came from, one line each, indented by generation."""
    seen = seen if seen is not None else set()
    run_dir = Path(run_dir)
    pad = "  " * depth
    if run_dir.is_file():  # a .safetensors file fine-tuned from
        return [f"{pad}file {run_dir}"]
    if (run_dir / "best.json").is_file():  # a sweep
        best = json.loads((run_dir / "best.json").read_text())
        return [f"{pad}sweep {run_dir}: best trial {best['trial']} at epoch {best['epoch']}, config {best['config']}"]
    if not (run_dir / "model.json").is_file():
        return [f"{pad}{run_dir} (no longer there)"]
    if str(run_dir.resolve()) in seen:
        return [f"{pad}{run_dir} (above)"]
    seen.add(str(run_dir.resolve()))
    lines = [f"{pad}run {run_dir}: {_describe(run_dir)}"]
    if (run_dir / "spec.yaml").is_file():
        lines.append(f"{pad}  spec {run_dir / 'spec.yaml'}")
    if (run_dir / RECORD).is_file():
        record = json.loads((run_dir / RECORD).read_text())
        lines.append(f"{pad}  MLflow run {record['run_id']} ({record['uri']})")
    info = json.loads((run_dir / "model.json").read_text())
    for relation, parent in parents(info).items():
        lines.append(f"{pad}  {PARENTS.get(relation, relation)}:")
        lines += lineage(Path(parent), depth + 2, seen)
    return lines


def track_sweep(sweep_dir: Path, rows: list[dict], spec, uri: str, best_run: Path | None) -> str:
    """The sweep as an MLflow run (its space and scheduler as parameters, the best figure as a metric), each
    trial as a run nested under it (its config, its last figures, its status); the best run tracked with
    them. Returns the sweep's MLflow run id."""
    from mlflow.entities import Metric, Param

    c = client(uri)
    eid = experiment_id(c, spec.tracking.experiment, uri)
    sweep = spec.sweep
    parent = c.create_run(eid, run_name=f"{spec.name} sweep", tags={"raybig.sweep_dir": str(Path(sweep_dir).resolve())})
    now = int(time.time() * 1000)
    settings = {"sweep.metric": sweep.metric, "sweep.searcher": sweep.searcher, "sweep.scheduler": sweep.scheduler.name,
                **{f"space.{k}": json.dumps(v.model_dump(exclude_none=True)) for k, v in sweep.space.items()}}
    c.log_batch(parent.info.run_id, params=[Param(k, v[:6000]) for k, v in settings.items()])
    for row in rows:
        child = c.create_run(eid, run_name=f"{spec.name}-{row['trial']}",
                             tags={"mlflow.parentRunId": parent.info.run_id, "raybig.status": row["status"]})
        c.log_batch(child.info.run_id,
                    params=[Param(p, json.dumps(row[p])) for p in sweep.space if p in row],
                    metrics=[Metric(k, float(v), now, int(row.get("epochs", 0))) for k, v in row.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and k != "epochs"])
        c.set_terminated(child.info.run_id, "FINISHED" if row["status"] != "failed" else "FAILED")
    values = [row[sweep.metric] for row in rows if row[sweep.metric] == row[sweep.metric]]
    if values:
        c.log_metric(parent.info.run_id, f"best_{sweep.metric}", (max if sweep.goal == "max" else min)(values))
    if best_run is not None:
        best_id = track_run(best_run, uri, spec.tracking.experiment)
        c.set_tag(parent.info.run_id, "raybig.best_run", best_id)
    c.set_terminated(parent.info.run_id)
    return parent.info.run_id
