"""KubeRay manifests for a job spec: a RayCluster sized for its layout (for `raybig submit`), a RayJob that
trains the spec on a cluster of its own, and a RayService that serves the model it trains.

Written by `raybig export kuberay SPEC`; clusters/kuberay/ holds the ones for the shipped demo, and a test
keeps them equal to what the command writes and valid against KubeRay's v1 CRD schemas.

Everything a pod needs travels with the manifests: the image has raybig installed (clusters/kuberay/Dockerfile),
the resolved spec rides in a ConfigMap mounted into the RayJob's head, and the model store is either a
PersistentVolumeClaim mounted at /models on every pod or an s3:// / gs:// URI (credentials from a Secret).
Token auth is on: KubeRay creates the token and hands it to every Ray container.
"""
from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import ray
import yaml

import raybig
from raybig.errors import SpecError
from raybig.spec import JobSpec
from raybig.store_io import is_uri, join

STORE_MOUNT = "/models"
SPEC_MOUNT = "/etc/raybig"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap, the Serve config) as readable literal blocks."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def default_image(gpu: bool) -> str:
    """What `docker build -f clusters/kuberay/Dockerfile .` is tagged as in docs/clusters.md."""
    return f"raybig:{raybig.__version__}" + ("-gpu" if gpu else "")


def resource_name(spec: JobSpec) -> str:
    """A DNS-1123 name for the spec (Kubernetes names: lower case, digits and '-')."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"raybig-{spec.name}".lower()).strip("-")
    return name[:40].rstrip("-")


class Layout:
    """How the manifests run one spec: image, store, credentials."""

    def __init__(self, spec: JobSpec, image: str | None, store_claim: str | None, store: str | None,
                 env_secret: str | None):
        if store_claim and store:
            raise SpecError("give --store-claim (a volume at /models) or --store (an s3:// or gs:// URI), not both",
                            "--store")
        if store and not is_uri(store):
            raise SpecError(f"on Kubernetes a store is a volume claim (--store-claim) or an s3:// or gs:// URI, "
                            f"not {store!r}", "--store")
        self.gpus = math.ceil(spec.resources.gpus_per_worker)
        self.image = image or default_image(self.gpus > 0)
        self.claim = None if store else (store_claim or "raybig-models")
        self.store = store or STORE_MOUNT
        self.env_secret = env_secret

    def container(self, name: str, cpus: int, gpus: int = 0, memory: str = "4Gi", read_only: bool = False) -> dict:
        limits = {"cpu": str(cpus), "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        container = {"name": name, "image": self.image, "resources": {"requests": dict(limits), "limits": limits}}
        if self.env_secret:  # e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for an s3:// store
            container["envFrom"] = [{"secretRef": {"name": self.env_secret}}]
        if self.claim:
            container["volumeMounts"] = [{"name": "models", "mountPath": STORE_MOUNT, **({"readOnly": True}
                                                                                        if read_only else {})}]
        return container

    def pod(self, container: dict, read_only: bool = False) -> dict:
        spec = {"containers": [container]}
        if self.claim:
            spec["volumes"] = [{"name": "models", "persistentVolumeClaim": {
                "claimName": self.claim, **({"readOnly": True} if read_only else {})}}]
        return {"spec": spec}

    def command_line(self) -> str:
        flags = []
        if self.claim:
            flags.append(f"--store-claim {self.claim}")
        if self.store != STORE_MOUNT:
            flags.append(f"--store {shlex.quote(self.store)}")
        if self.env_secret:
            flags.append(f"--env-secret {self.env_secret}")
        return " ".join(flags)


def cluster_spec(spec: JobSpec, layout: Layout) -> dict:
    """A head that schedules nothing (num-cpus 0) and one worker pod per rank."""
    workers = spec.parallelism.workers
    head = layout.container("ray-head", 2)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}]
    worker = layout.container("ray-worker", max(1, math.ceil(spec.resources.cpus_per_worker)), layout.gpus)
    return {
        "rayVersion": ray.__version__,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": layout.pod(head)},
        "workerGroupSpecs": [{"groupName": "train", "replicas": workers, "minReplicas": workers,
                              "maxReplicas": workers, "rayStartParams": {}, "template": layout.pod(worker)}],
    }


def job_entrypoint(spec: JobSpec, layout: Layout) -> list[str]:
    return ["python", "-m", "raybig", "run", f"{SPEC_MOUNT}/{spec.name}.yaml", "--address", "auto",
            "--set", f"output.dir={layout.store}"]


def raycluster(spec: JobSpec, layout: Layout) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": resource_name(spec)},
            "spec": cluster_spec(spec, layout)}


def rayjob(spec: JobSpec, layout: Layout) -> list[dict]:
    """A ConfigMap with the resolved spec, and a RayJob whose head mounts it and runs it."""
    name = resource_name(spec)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-spec"},
                  "data": {f"{spec.name}.yaml": spec.to_yaml()}}
    cluster = cluster_spec(spec, layout)
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    head_pod["containers"][0].setdefault("volumeMounts", []).append(
        {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True})
    head_pod.setdefault("volumes", []).append({"name": "spec", "configMap": {"name": f"{name}-spec"}})
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": f"{name}-job"},
           "spec": {"entrypoint": shlex.join(job_entrypoint(spec, layout)), "rayClusterSpec": cluster,
                    "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600, "backoffLimit": 0}}
    return [config_map, job]


def rayservice(spec: JobSpec, layout: Layout) -> dict | None:
    """Serves the run the RayJob writes; Serve reads runs from a path, so only with a volume claim."""
    if not layout.claim:
        return None
    from raybig.serve.export import rayservice as serve_rayservice, serve_config

    run = f"{spec.name}:{spec.serve.version}={join(STORE_MOUNT, spec.name)}"
    config = serve_config([run], spec.serve.port, spec.serve.request_timeout_s)
    return serve_rayservice(f"{resource_name(spec)}-serve", config, layout.image, layout.claim)


def manifests(spec: JobSpec, image: str | None = None, store_claim: str | None = None, store: str | None = None,
              env_secret: str | None = None) -> dict[str, list[dict]]:
    """{kind: [documents]} for the files `export` writes."""
    layout = Layout(spec, image, store_claim, store, env_secret)
    found = {"raycluster": [raycluster(spec, layout)], "rayjob": rayjob(spec, layout)}
    service = rayservice(spec, layout)
    if service is not None:
        found["rayservice"] = [service]
    return found


def export(spec: JobSpec, spec_path: str, out_dir: str, image: str | None = None, store_claim: str | None = None,
           store: str | None = None, env_secret: str | None = None, overrides: list[str] | None = None) -> list[Path]:
    layout = Layout(spec, image, store_claim, store, env_secret)
    command = " ".join(["raybig export kuberay", spec_path, *(f"--set {shlex.quote(o)}" for o in overrides or []),
                        layout.command_line(), *([f"--image {image}"] if image else [])]).strip()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, documents in manifests(spec, image, store_claim, store, env_secret).items():
        path = out / f"{spec.name}.{kind}.yaml"
        path.write_text(f"# generated by: {command}\n" + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    return written
