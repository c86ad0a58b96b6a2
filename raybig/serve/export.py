"""`raybig serve --export DIR`: a Serve config for `serve deploy` and a KubeRay RayService manifest."""
from pathlib import Path

import yaml

import ray

RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-cpu"


def serve_config(runs: list[str], port: int, request_timeout_s: float, trust_code: bool = False) -> dict:
    """The Serve config of `raybig serve`'s application; the proxy's options as `raybig serve` sets them."""
    args = {"runs": runs, **({"trust_code": True} if trust_code else {})}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": port, "request_timeout_s": request_timeout_s},
        "applications": [{"name": "raybig", "route_prefix": "/", "import_path": "raybig.serve.deploy:app",
                          "args": args}],
    }


def rayservice(name: str, config: dict, image: str, store_claim: str | None) -> dict:
    """A RayService running the config; the runs' paths must exist in the pods (the image, or the
    persistent volume claim mounted at /models when `store_claim` is given)."""
    container = {
        "name": "ray-head", "image": image,
        "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 8000, "name": "serve"}],
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
    }
    pod = {"containers": [container]}
    if store_claim:
        container["volumeMounts"] = [{"name": "models", "mountPath": "/models", "readOnly": True}]
        pod["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": store_claim, "readOnly": True}}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "authOptions": {"mode": "token"},
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"}, "template": {"spec": pod}},
            },
        },
    }


def export(entries, out_dir: str, port: int, image: str = RAY_IMAGE, store_claim: str | None = None,
           path_prefix: str | None = None) -> list[Path]:
    """Write serve_config.yaml and rayservice.yaml; `path_prefix` rewrites each run's directory to where it
    lives on the cluster (e.g. /models), keeping its own name."""
    runs = [f"{e.name}:{e.version}=" + (f"{path_prefix.rstrip('/')}/{Path(e.run_dir).name}" if path_prefix else e.run_dir)
            for e in entries]
    config = serve_config(runs, port, entries[0].serve.request_timeout_s,
                          trust_code=any(e.trust_code for e in entries))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"raybig-{entries[0].name}".lower().replace("_", "-").replace(".", "-")[:50]
    files = [out / "serve_config.yaml", out / "rayservice.yaml"]
    files[0].write_text(yaml.safe_dump(config, sort_keys=False))
    files[1].write_text(yaml.safe_dump(rayservice(name, config, image, store_claim), sort_keys=False))
    return files
