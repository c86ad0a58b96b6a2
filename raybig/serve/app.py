"""The HTTP side: a FastAPI gateway (Serve ingress) that validates requests and routes them to the
deployment of the requested model version.

Versions are separate deployments rather than Serve model multiplexing: each version keeps its weights
loaded, its own replicas and autoscaling, and a request never waits for a model to be swapped in.
Multiplexing pays off for many rarely-used models sharing replicas; a handful of versions does not need it.
"""

import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from fastapi import FastAPI, Header, HTTPException, Query, Request
from pydantic import ValidationError
from ray import serve

from raybig.errors import SpecError
from raybig.serve.replica import ModelReplica
from raybig.serve.inputs import as_batch
from raybig.serve.schemas import (GenerateRequest, GenerateResponse, ModelCard, Prediction, PredictRequest,
                                  PredictResponse)
from raybig.spec import ServeSpec
from raybig.train.checkpoint import RunStore

api = FastAPI(title="raybig", description="Models trained by raybig, served by Ray Serve.")


@dataclass
class ModelEntry:
    """One version of one model: where its run lives and how to serve it."""
    name: str
    version: str
    run_dir: str
    serve: ServeSpec
    info: dict = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        return f"{self.name}--{self.version}"


def entry_from_arg(arg: str) -> ModelEntry:
    """`runs/x`, or `name:version=runs/x` to name the model and version explicitly."""
    name = version = None
    path = arg
    if "=" in arg:
        label, path = arg.split("=", 1)
        name, _, version = label.partition(":")
    store = RunStore(path)
    info = store.model_info()
    if info is None:
        raise SpecError(f"{path} holds no trained model (no model.json); train it with `raybig run` first")
    raw = yaml.safe_load((store.root / "spec.yaml").read_text()) if (store.root / "spec.yaml").exists() else {}
    settings = ServeSpec.model_validate((raw or {}).get("serve") or {})
    return ModelEntry(name or info["name"], version or settings.version, str(Path(path).resolve()), settings, info)


def _body(schema) -> dict:
    """The request schema for /docs: bodies are parsed by hand so that size and auth come first."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress(api)
class Gateway:
    def __init__(self, handles: dict, entries: list[dict], defaults: dict[str, str], settings: dict):
        self.handles = handles  # deployment name -> handle
        self.entries = {(e["name"], e["version"]): e for e in entries}
        self.defaults = defaults
        self.max_payload_bytes = settings["max_payload_bytes"]
        self.token = settings.get("token")

    async def _read(self, request: Request, schema):
        """Auth, then size, then JSON, then the schema: each failure its own 4xx, before any work is done."""
        if self.token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_payload_bytes:
            raise HTTPException(413, f"request body of {declared} bytes is over the limit of {self.max_payload_bytes}")
        raw = await request.body()
        if len(raw) > self.max_payload_bytes:
            raise HTTPException(413, f"request body of {len(raw)} bytes is over the limit of {self.max_payload_bytes}")
        try:
            return schema.model_validate_json(raw)
        except ValidationError as err:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)]
            raise HTTPException(422, "; ".join(problems)) from None

    def _entry(self, name: str, version: str | None) -> dict:
        if name not in self.defaults:
            raise HTTPException(404, f"no model named {name!r}; serving: {', '.join(sorted(self.defaults))}")
        version = version or self.defaults[name]
        entry = self.entries.get((name, version))
        if entry is None:
            known = sorted(v for n, v in self.entries if n == name)
            raise HTTPException(404, f"model {name!r} has no version {version!r}; versions: {', '.join(known)}")
        return entry

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": len(self.entries)}

    @api.get("/v1/models", response_model=list[ModelCard])
    async def models(self) -> list[ModelCard]:
        cards = []
        for (name, version), e in sorted(self.entries.items()):
            info = e["info"]
            cards.append(ModelCard(
                name=name, version=version, default=self.defaults[name] == version, kind=info["kind"],
                task=info["data"]["task"], input_shape=info["data"]["shape"], classes=info["data"]["num_classes"],
                epoch=info["epoch"], metrics=info["metrics"],
                batching=await self.handles[e["deployment"]].batching.remote()))
        return cards

    @api.post("/v1/models/{name}/predict", response_model=PredictResponse, openapi_extra=_body(PredictRequest))
    async def predict(self, name: str, request: Request, version: str | None = Query(None),
                      x_model_version: str | None = Header(None)) -> PredictResponse:
        body = await self._read(request, PredictRequest)
        entry = self._entry(name, version or x_model_version)
        if entry["info"]["data"]["task"] != "classification":
            raise HTTPException(422, f"{name} is a language model: POST /v1/models/{name}/generate")
        x = as_batch(body.inputs, entry["info"]["data"]["shape"], entry["max_samples"])
        probs = await self.handles[entry["deployment"]].predict.remote(x)
        return PredictResponse(model=name, version=entry["version"], predictions=[
            Prediction(label=int(p.argmax()), probabilities=[round(float(v), 6) for v in p]) for p in probs])

    @api.post("/v1/models/{name}/generate", response_model=GenerateResponse, openapi_extra=_body(GenerateRequest))
    async def generate(self, name: str, request: Request, version: str | None = Query(None),
                       x_model_version: str | None = Header(None)) -> GenerateResponse:
        body = await self._read(request, GenerateRequest)
        entry = self._entry(name, version or x_model_version)
        data = entry["info"]["data"]
        if data["task"] != "lm":
            raise HTTPException(422, f"{name} is a classifier: POST /v1/models/{name}/predict")
        unknown = sorted(set(body.prompt) - set(data["vocab"]))
        if unknown:
            raise HTTPException(422, f"prompt has characters the model never saw: {''.join(unknown)!r}")
        text = await self.handles[entry["deployment"]].generate.remote(
            body.prompt, body.max_new_tokens, body.temperature, body.seed)
        return GenerateResponse(model=name, version=entry["version"], text=text)


def build_app(entries: list[ModelEntry]):
    """The Serve application: one deployment per model version, and the gateway in front."""
    if not entries:
        raise SpecError("give at least one run directory to serve")
    seen = set()
    for e in entries:
        if (e.name, e.version) in seen:
            raise SpecError(f"{e.name}:{e.version} is given twice; name versions as name:version=RUN_DIR")
        seen.add((e.name, e.version))
    handles = {}
    for e in entries:
        s = e.serve
        options = {"name": e.deployment, "ray_actor_options": {"num_cpus": s.cpus_per_replica,
                                                               "num_gpus": s.gpus_per_replica},
                   "max_ongoing_requests": max(64, 2 * s.max_batch_size)}
        if s.autoscaling:
            options["autoscaling_config"] = s.autoscaling.model_dump()
        else:
            options["num_replicas"] = s.replicas
        handles[e.deployment] = serve.deployment(ModelReplica).options(**options).bind(
            e.run_dir, s.max_batch_size, s.batch_wait_ms, max(1, int(s.cpus_per_replica)))
    defaults = {e.name: e.version for e in entries}  # the last version given for a name is its default
    first = entries[0].serve
    token = None
    if first.auth_token_env:  # read where `raybig serve` runs: replicas do not share the caller's environment
        token = os.environ.get(first.auth_token_env)
        if not token:
            raise SpecError(f"{first.auth_token_env} is not set (or empty) in the environment", "serve.auth_token_env")
    settings = {"max_payload_bytes": first.max_payload_bytes, "token": token}
    described = [{"name": e.name, "version": e.version, "deployment": e.deployment, "info": e.info,
                  "max_samples": e.serve.max_samples_per_request} for e in entries]
    return Gateway.bind(handles, described, defaults, settings)


def start(entries: list[ModelEntry], host: str, port: int, blocking: bool = False):
    """Run the application on Serve's HTTP proxy at host:port; returns the base URL."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # per-request logs stay in Ray's log files
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(entries), name="raybig", route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"
