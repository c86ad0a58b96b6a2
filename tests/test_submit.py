"""A real `ray start --head --block` on loopback, in its own process group; jobs submitted through Ray Job
Submission with raybig (and once with the stock `ray job submit`)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raybig.clusterspec import load_cluster
from raybig.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def raybig(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # one Ray at a time: the session's local Ray comes back for later modules
    tmp = tmp_path_factory.mktemp("cluster")
    cluster_file = tmp / "test-cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({
        "name": "raybig-test", "store": str(tmp / "store"),
        "head": {"port": 6392, "dashboard_port": 8292, "client_server_port": 23092, "num_cpus": 2}}))
    up = raybig("cluster", "up", str(cluster_file), env={"RAYBIG_CACHE": str(tmp / "cache")})
    assert up.returncode == 0, up.stdout + up.stderr
    pgid = int(re.search(r"process group (\d+)", up.stdout).group(1))
    yield {"file": str(cluster_file), "store": tmp / "store", "address": "http://127.0.0.1:8292", "pgid": pgid}
    down = raybig("cluster", "down", str(cluster_file), env={"RAYBIG_CACHE": str(tmp / "cache")})
    try:
        os.killpg(pgid, signal.SIGKILL)  # in case `down` could not: only the group this test started
    except ProcessLookupError:
        pass
    assert down.returncode == 0, down.stderr


def test_submitted_job_runs_to_success_and_leaves_its_model_in_the_store(head):
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--set", "train.epochs=2", "--follow")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job_id = re.search(r"submitted\S*: (\S+)", proc.stdout).group(1)
    assert job_id.startswith("digits-mlp-")
    assert f"{job_id}: SUCCEEDED" in proc.stdout
    run = head["store"] / "digits-mlp"
    assert (run / "model.safetensors").is_file()
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2]
    listed = raybig("jobs", "list", "--cluster", head["file"])
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout


def test_a_long_job_is_stopped(head):
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--set", "train.epochs=2000",
                  "--set", "name=long-job")
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted\S*: (\S+)", proc.stdout).group(1)
    deadline = time.time() + 120
    while time.time() < deadline and "RUNNING" not in raybig("jobs", "status", job_id, "--cluster", head["file"]).stdout:
        time.sleep(1)
    stopped = raybig("jobs", "stop", job_id, "--cluster", head["file"])
    assert stopped.returncode == 0 and f"{job_id}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in raybig("jobs", "status", job_id, "--address", head["address"]).stdout


def test_the_stock_ray_job_submit_runs_a_spec(head):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    excludes = json.dumps({"excludes": ["runs/", ".venv/", ".git/", "**/__pycache__/"]})
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
         "--runtime-env-json", excludes, "--", "python", "-m", "raybig", "run", "jobs/digits_mlp.yaml",
         "--address", "auto", "--set", f"output.dir={head['store']}", "--set", "name=stock-submit",
         "--set", "train.epochs=1"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "RAY_AUTH_MODE": "token"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (head["store"] / "stock-submit" / "model.safetensors").is_file()


def test_unreachable_address_is_one_clear_line():
    proc = raybig("jobs", "list", "--address", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "cannot reach a Ray cluster" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_token_is_one_clear_line(head, tmp_path):
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": ""}
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], env=env)
    assert proc.returncode == 2 and "no Ray auth token" in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_token_is_refused(head):
    proc = raybig("jobs", "list", "--cluster", head["file"], env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert proc.returncode == 2 and "refused the auth token" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, field", [
    ("name: x\nstore: relative/path\nhead: {}\n", "store"),
    ("name: x\nstore: /s\nhead: {cpus: 2}\n", "head.cpus"),
    ("name: x\nstore: /s\n", "address"),
    ("name: x\nstore: /s\nhead: {host: 0.0.0.0}\n", "head.host"),
    ("name: [x\n", "invalid YAML"),
])
def test_malformed_cluster_file(tmp_path, content, field):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(SpecError) as info:
        load_cluster(path)
    assert field in info.value.render()
    proc = raybig("jobs", "list", "--cluster", str(path))
    assert proc.returncode == 2 and field in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_local_cluster_file_is_valid():
    cluster = load_cluster(ROOT / "clusters" / "local.yaml")
    assert cluster.head.host == "127.0.0.1" and cluster.submit_address.startswith("http://127.0.0.1:")


def test_entrypoint_quotes_every_piece():
    from raybig.submit import entrypoint

    line = entrypoint("run", "jobs/x.yaml", ["name=a; rm -rf /", "train.epochs=3"])
    assert "'name=a; rm -rf /'" in line and line.startswith("python -m raybig run jobs/x.yaml --address auto")


def _unknown_fields(value, schema, path="") -> list[str]:
    bad = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            bad += [f"{path}.{key}"] if key not in schema["properties"] else \
                _unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            bad += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return bad


def test_shipped_kuberay_manifests_match_the_generator_and_the_crd_schemas(tmp_path):
    import jsonschema

    proc = raybig("export", "kuberay", "jobs/digits_cnn.yaml", "--store-claim", "raybig-models", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for kind in ("raycluster", "rayjob", "rayservice"):
        generated = (tmp_path / f"digits-cnn.{kind}.yaml").read_text()
        assert (ROOT / "clusters" / "kuberay" / f"digits-cnn.{kind}.yaml").read_text() == generated, \
            "regenerate: raybig export kuberay jobs/digits_cnn.yaml --store-claim raybig-models"
        manifest = yaml.safe_load(generated)
        schema = json.loads((ROOT / "tests" / "data" / "kuberay" / f"{kind}.v1.schema.json").read_text())
        jsonschema.validate(manifest, schema)
        assert _unknown_fields(manifest, schema) == []
    job = yaml.safe_load((tmp_path / "digits-cnn.rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2  # data degree 2
    assert job["spec"]["entrypoint"].startswith("python -m raybig run jobs/digits_cnn.yaml")


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_up_configs_pass_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "clusters" / name).read_text())
    validate_config(prepare_config(config))
    assert any(t.get("resources", {}).get("GPU") for t in config["available_node_types"].values())


def test_pull_copies_a_run_from_a_store(tmp_path):
    run = tmp_path / "store" / "some-run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "checkpoints" / "epoch-0001" / "meta.json").write_text("{}")
    proc = raybig("pull", "some-run", "--store", str(tmp_path / "store"), "--to", str(tmp_path / "local"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "local" / "some-run" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "local" / "some-run" / "checkpoints" / "epoch-0001" / "meta.json").exists()
    missing = raybig("pull", "nope", "--store", str(tmp_path / "store"))
    assert missing.returncode == 2 and "no run named" in missing.stderr
