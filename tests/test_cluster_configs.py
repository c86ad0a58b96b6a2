"""The files in clusters/: the local cluster file, the ray-up configs (Ray's own validator) and the KubeRay
manifests (KubeRay's v1 CRD schemas, and equal to what `raybig export kuberay` writes). No Ray is started."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raybig.clusterspec import load_cluster

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"


def raybig(*args):
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=os.environ)


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare: what the API server's strict field validation refuses."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        if "properties" in schema:
            bad = []
            for key, item in value.items():
                if key in schema["properties"]:
                    bad += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
                else:
                    bad.append(f"{path}.{key}")
            return bad
        if isinstance(schema.get("additionalProperties"), dict):
            return [b for key, item in value.items()
                    for b in unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and "items" in schema:
        return [b for i, item in enumerate(value) for b in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def check_against_crd(manifest: dict) -> None:
    import jsonschema

    schema = json.loads((SCHEMAS / f"{manifest['kind'].lower()}.v1.schema.json").read_text())
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []


def test_unknown_fields_are_found():
    schema = json.loads((SCHEMAS / "raycluster.v1.schema.json").read_text())
    manifest = yaml.safe_load((ROOT / "clusters" / "kuberay" / "digits-cnn.raycluster.yaml").read_text())
    manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert unknown_fields(manifest, schema) == [".spec.headGroupSpec.template.spec.containers[0].imagePullPolice"]


def test_shipped_kuberay_manifests_are_what_export_writes_and_fit_the_crds(tmp_path):
    from raybig.spec import load_spec, parse_spec

    proc = raybig("export", "kuberay", "jobs/digits_cnn.yaml", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for kind in ("raycluster", "rayjob", "rayservice"):
        generated = (tmp_path / f"digits-cnn.{kind}.yaml").read_text()
        assert (ROOT / "clusters" / "kuberay" / f"digits-cnn.{kind}.yaml").read_text() == generated, \
            "clusters/kuberay is stale: rerun raybig export kuberay jobs/digits_cnn.yaml"
        for doc in yaml.safe_load_all(generated):
            if doc["apiVersion"] == "ray.io/v1":
                check_against_crd(doc)

    config_map, job = yaml.safe_load_all((tmp_path / "digits-cnn.rayjob.yaml").read_text())
    spec = load_spec(ROOT / "jobs" / "digits_cnn.yaml")
    (key, text), = config_map["data"].items()
    assert config_map["kind"] == "ConfigMap" and parse_spec(yaml.safe_load(text)) == spec
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:4] == ["python", "-m", "raybig", "run"] and args[4] == f"/etc/raybig/{key}"
    assert args[5:] == ["--address", "auto", "--set", "output.dir=/models"]
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert {"name": "spec", "configMap": {"name": config_map["metadata"]["name"]}} in head["volumes"]
    assert {"name": "spec", "mountPath": "/etc/raybig", "readOnly": True} in head["containers"][0]["volumeMounts"]
    assert cluster["workerGroupSpecs"][0]["replicas"] == spec.parallelism.workers == 2
    assert cluster["authOptions"] == {"mode": "token"}
    service = yaml.safe_load((tmp_path / "digits-cnn.rayservice.yaml").read_text())
    assert "digits-cnn:v1=/models/digits-cnn" in service["spec"]["serveConfigV2"]


def test_export_with_an_object_store_and_credentials_from_a_secret(tmp_path):
    proc = raybig("export", "kuberay", "jobs/digits_mlp.yaml", "--set", "resources.gpus_per_worker=1",
                  "--store", "s3://bucket/raybig", "--env-secret", "s3-credentials", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-mlp.raycluster.yaml", "digits-mlp.rayjob.yaml"]
    cluster = yaml.safe_load((tmp_path / "digits-mlp.raycluster.yaml").read_text())
    check_against_crd(cluster)
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "volumes" not in worker
    assert worker["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["containers"][0]["image"] == "raybig:0.1.0-gpu"
    _, job = yaml.safe_load_all((tmp_path / "digits-mlp.rayjob.yaml").read_text())
    check_against_crd(job)
    assert job["spec"]["entrypoint"].endswith("--set output.dir=s3://bucket/raybig")


@pytest.mark.parametrize("args, message", [
    (["--store", "/data/runs"], "--store"),
    (["--store", "s3://b/p", "--store-claim", "pvc"], "not both"),
])
def test_export_refuses_a_store_pods_cannot_share(tmp_path, args, message):
    proc = raybig("export", "kuberay", "jobs/digits_mlp.yaml", *args, "--out", str(tmp_path))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_up_configs_pass_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "clusters" / name).read_text())
    validate_config(prepare_config(config))
    assert any(t.get("resources", {}).get("GPU") for t in config["available_node_types"].values())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)  # token auth on every node
    config["head_node_typ"] = "head"  # the validator does refuse what it does not know
    with pytest.raises(Exception, match="head_node_typ"):
        validate_config(prepare_config(config))


def test_shipped_local_cluster_file():
    cluster = load_cluster(ROOT / "clusters" / "local.yaml")
    assert cluster.head.host == "127.0.0.1" and cluster.submit_address == f"http://127.0.0.1:{cluster.head.dashboard_port}"
    assert cluster.head.num_cpus >= 2 and cluster.store.startswith("/")


def test_pull_copies_a_run_from_a_path_store(tmp_path):
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
