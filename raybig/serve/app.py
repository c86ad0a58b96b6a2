"""The HTTP side: one Serve ingress deployment that validates requests and answers them with the model
versions it holds in memory.

Why one deployment and not a gateway in front of a deployment per version: every hop between Serve
processes cost milliseconds on a small machine, where the forward pass of a served model takes well under
one (docs/benchmarks.md: 0.19x of a bare FastAPI process through proxy, gateway and replica). So each
replica holds every version, batches each version's requests in-process (raybig.serve.batching, one queue
per version) and, with Serve's direct ingress, takes HTTP itself: a request never leaves the process that
parses it. The price: all versions share one deployment's replicas and autoscaling (a handful of small
versions fits in one replica's memory); many large or rarely used versions would call for Serve's model
multiplexing instead.
"""

import asyncio
import gc
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import ray
import torch
import yaml
from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray import serve

from raybig.data.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from raybig.errors import SpecError
from raybig.serve import openai_compat
from raybig.serve.inputs import as_batch, parse_predict_body
from raybig.serve.openai_compat import ChatRequest, CompletionRequest
from raybig.serve.replica import ServedModel
from raybig.serve.schemas import (GenerateRequest, GenerateResponse, ModelCard, OpenAIErrorResponse, PredictRequest,
                                  PredictResponse, error_responses)
from raybig.spec import ServeSpec
from raybig.store_io import is_uri, local_model
from raybig.train.checkpoint import RunStore

APP_NAME = "raybig"
api = FastAPI(title="raybig", description="Models trained by raybig, served by Ray Serve.")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> Response:
    """FastAPI's own checks (of a query or header) answer like raybig's: one message, `detail` a string."""
    problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return Response(orjson.dumps({"detail": "; ".join(problems)}), 422, media_type="application/json")


# A completion's 200: one JSON body, or server-sent events when the request asks to stream.
COMPLETION_200 = {200: {"description": "The completion (OpenAI's shape), or its stream of server-sent events.",
                        "content": {"application/json": {}, "text/event-stream": {"schema": {  # each event
                            "type": "object", "required": ["data"], "properties": {"data": {
                                "type": "string", "description": "A chunk (JSON, OpenAI's shape), last [DONE]."}}}}}}}
OPENAI_ERRORS = error_responses(400, 401, 404, 413, schema=OpenAIErrorResponse)


@dataclass
class ModelEntry:
    """One version of one model: where its run lives and how to serve it."""
    name: str
    version: str
    run_dir: str
    serve: ServeSpec
    info: dict = field(default_factory=dict)
    trust_code: bool = False  # a python model's factory may be imported (raybig serve --trust-code)


def entry_from_arg(arg: str, trust_code: bool = False) -> ModelEntry:
    """`runs/x` (or an s3:// / gs:// run), or `name:version=runs/x` to name the model and version explicitly.
    A run whose model is user code (kind python) is refused unless `trust_code`: serving it runs that code."""
    name = version = None
    path = arg
    if "=" in arg and "://" not in arg.split("=", 1)[0]:  # a URI's own query has '=' too
        label, path = arg.split("=", 1)
        name, _, version = label.partition(":")
    store = RunStore(local_model(path, files=("model.json", "spec.yaml")))  # the weights are the replicas' to fetch
    info = store.model_info()
    if info is None:
        raise SpecError(f"{path} holds no trained model (no model.json); train it with `raybig run` first")
    if info.get("kind") == "python" and not trust_code:
        model = info.get("model", {})
        raise SpecError(f"{path} is a python model: serving it imports and runs {model.get('factory')} (from "
                        f"{', '.join(model.get('code') or ['the installed packages'])}); pass --trust-code if you "
                        "trust that code", "--trust-code")
    raw = yaml.safe_load((store.root / "spec.yaml").read_text()) if (store.root / "spec.yaml").exists() else {}
    settings = ServeSpec.model_validate((raw or {}).get("serve") or {})
    where = path if is_uri(path) else str(Path(path).resolve())  # each replica fetches a URI's files itself
    return ModelEntry(name or info["name"], version or settings.version, where, settings, info, trust_code)


def _body(schema) -> dict:
    """The request schema for /docs: bodies are parsed by hand so that size and auth come first. Its
    definitions are inlined: FastAPI puts nothing of an `openapi_extra` into the document's components."""
    doc = schema.model_json_schema()
    definitions = doc.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return inline(definitions[ref.rsplit("/", 1)[-1]]) if ref.startswith("#/$defs/") else \
                {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(doc)}}}}


def _json(content, status: int = 200) -> Response:
    """A JSON response serialized by orjson, skipping FastAPI's response_model pass (the hot path)."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class ModelServer:
    """Every served version in memory; requests are checked and answered in this process."""

    def __init__(self, entries: list[dict], defaults: dict[str, str], settings: dict):
        torch.set_num_threads(settings["threads"])
        self.entries = {(e["name"], e["version"]): e for e in entries}
        self.models = {key: ServedModel(e["run_dir"], e["max_batch_size"], e["batch_wait_ms"], e["trust_code"])
                       for key, e in self.entries.items()}
        self.defaults = defaults
        self.max_payload_bytes = settings["max_payload_bytes"]
        self.token = settings.get("token")
        # who answers: after a replica is lost, /v1/models shows its successor (a new id, a later start)
        self.replica, self.started = serve.get_replica_context().replica_id.unique_id, time.time()
        # Everything loaded so far (Ray, torch, FastAPI, the weights) lives as long as the replica: out of the
        # collector's sight, a full collection no longer walks it, which had stalled every request ~150 ms.
        gc.freeze()

    async def _read(self, request: Request) -> bytes:
        """Auth, then size: each failure its own 4xx, before the body is parsed."""
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
        return raw

    def _entry(self, name: str, version: str | None) -> tuple[dict, ServedModel]:
        if name not in self.defaults:
            raise HTTPException(404, f"no model named {name!r}; serving: {', '.join(sorted(self.defaults))}")
        key = (name, version or self.defaults[name])
        if key not in self.entries:
            known = sorted(v for n, v in self.entries if n == name)
            raise HTTPException(404, f"model {name!r} has no version {key[1]!r}; versions: {', '.join(known)}")
        return self.entries[key], self.models[key]

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
                epoch=info["epoch"], metrics=info["metrics"], batching=self.models[(name, version)].batching(),
                replica=self.replica, replica_started=self.started))
        return cards

    @api.post("/v1/models/{name}/predict", response_model=PredictResponse, openapi_extra=_body(PredictRequest),
              responses=error_responses(401, 404, 413, 422))
    async def predict(self, name: str, request: Request, version: str | None = Query(None),
                      x_model_version: str | None = Header(None)) -> Response:
        # The hot path: the body is parsed by orjson and checked by numpy, not by a pydantic model of a
        # float list; the reply is serialized by orjson. PredictRequest/PredictResponse document it.
        inputs = parse_predict_body(await self._read(request))
        entry, model = self._entry(name, version or x_model_version)
        task = entry["info"]["data"]["task"]
        if task == "lm":
            raise HTTPException(422, f"{name} is a language model: POST /v1/models/{name}/generate")
        x = as_batch(inputs, entry["info"]["data"]["shape"], entry["max_samples"])
        outputs = await model.predict(x)
        if task == "regression":
            predictions = [{"value": float(v[0])} for v in outputs]
        else:
            predictions = [{"label": int(p.argmax()), "probabilities": p} for p in np.round(outputs, 6)]
        return _json({"model": name, "version": entry["version"], "predictions": predictions})

    @api.post("/v1/models/{name}/generate", response_model=GenerateResponse, openapi_extra=_body(GenerateRequest),
              responses=error_responses(401, 404, 413, 422))
    async def generate(self, name: str, request: Request, version: str | None = Query(None),
                       x_model_version: str | None = Header(None)) -> GenerateResponse:
        raw = await self._read(request)
        try:
            body = GenerateRequest.model_validate_json(raw)
        except ValidationError as err:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)]
            raise HTTPException(422, "; ".join(problems)) from None
        entry, model = self._entry(name, version or x_model_version)
        data = entry["info"]["data"]
        if data["task"] != "lm":
            raise HTTPException(422, f"{name} is a classifier: POST /v1/models/{name}/predict")
        try:
            model.encode(body.prompt)
        except ValueError as err:
            raise HTTPException(422, f"prompt has {err}") from None
        # token by token generation takes a while: off the event loop, so batched predictions keep flowing
        text = await asyncio.to_thread(model.generate, body.prompt, body.max_new_tokens, body.temperature, body.seed)
        return GenerateResponse(model=name, version=entry["version"], text=text)

    @api.post("/v1/completions", openapi_extra=_body(CompletionRequest), responses={**COMPLETION_200, **OPENAI_ERRORS})
    async def completions(self, request: Request) -> Response:
        """OpenAI's completions API (docs/serving.md): `model` is a served name, or name:version."""
        return await self._openai(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=_body(ChatRequest), responses={**COMPLETION_200, **OPENAI_ERRORS})
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI's chat completions API; messages go through the chat template recorded with the run."""
        return await self._openai(request, chat=True)

    async def _openai(self, request: Request, chat: bool) -> Response:
        try:
            body = openai_compat.parse(ChatRequest if chat else CompletionRequest, await self._read(request))
            name, _, version = body.model.partition(":")
            entry, model = self._entry(name, version or None)
            if entry["info"]["data"]["task"] != "lm":
                raise openai_compat.BadRequest(f"{name} is a classifier: POST /v1/models/{name}/predict", "model")
            template = entry["info"].get("chat_template", DEFAULT_CHAT_TEMPLATE)
            prompt = render_chat(template, [m.model_dump() for m in body.messages]) if chat else body.prompt
            try:
                ids = model.encode(prompt)
            except ValueError as err:
                raise openai_compat.BadRequest(f"the {'messages have' if chat else 'prompt has'} {err}",
                                               "messages" if chat else "prompt") from None
        except HTTPException as err:
            return openai_compat.from_http_error(err)
        except openai_compat.BadRequest as err:
            return openai_compat.error(400, str(err), err.param)
        pieces, counted = model.continuation(ids, body.sampling(default_tokens=16))
        completion = openai_compat.Completion(chat, body.model, len(ids))
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await openai_compat.answer(completion, pieces, counted, body.stream, include_usage)


def build_app(entries: list[ModelEntry]):
    """The Serve application: one ingress deployment holding every version; its replicas, CPUs, auth and
    payload limit come from the first run given."""
    if not entries:
        raise SpecError("give at least one run directory to serve")
    seen = set()
    for e in entries:
        if (e.name, e.version) in seen:
            raise SpecError(f"{e.name}:{e.version} is given twice; name versions as name:version=RUN_DIR")
        seen.add((e.name, e.version))
    defaults = {e.name: e.version for e in entries}  # the last version given for a name is its default
    first = entries[0].serve
    token = None
    if first.auth_token_env:  # read where `raybig serve` runs: replicas do not share the caller's environment
        token = os.environ.get(first.auth_token_env)
        if not token:
            raise SpecError(f"{first.auth_token_env} is not set (or empty) in the environment", "serve.auth_token_env")
    # No access log line per request: writing them cost throughput and added latency spikes when the
    # buffered lines were flushed; errors and warnings are still logged (Ray's log files).
    options = {"ray_actor_options": {"num_cpus": first.cpus_per_replica, "num_gpus": first.gpus_per_replica},
               "logging_config": {"log_level": "WARNING", "enable_access_log": False}}
    if first.autoscaling:
        options["autoscaling_config"] = first.autoscaling.model_dump()
    else:
        options["num_replicas"] = first.replicas
    settings = {"max_payload_bytes": first.max_payload_bytes, "token": token,
                "threads": max(1, int(first.cpus_per_replica))}
    described = [{"name": e.name, "version": e.version, "run_dir": e.run_dir, "info": e.info,
                  "max_samples": e.serve.max_samples_per_request, "max_batch_size": e.serve.max_batch_size,
                  "batch_wait_ms": e.serve.batch_wait_ms, "trust_code": e.trust_code} for e in entries]
    return ModelServer.options(**options).bind(described, defaults, settings)


# How long the replicas may take to load their models and answer Serve's health check. Serve's own wait has
# no bound: replicas the cluster cannot place (too few CPUs) would keep `raybig serve` waiting for good.
START_TIMEOUT_S = float(os.environ.get("RAYBIG_SERVE_START_TIMEOUT_S", "300"))


class ServeStartFailed(RuntimeError):
    pass


def start(entries: list[ModelEntry], host: str, port: int) -> str:
    """Run the application on Serve's HTTP proxy at host:port, once its replicas are up; returns the base URL."""
    from ray.serve.context import _get_global_client

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # per-request logs stay in Ray's log files
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": entries[0].serve.request_timeout_s})
    serve._run(build_app(entries), name=APP_NAME, route_prefix="/", _blocking=False)
    try:
        _get_global_client()._wait_for_application_running(APP_NAME, timeout_s=START_TIMEOUT_S)
    except TimeoutError:
        serve.delete(APP_NAME, _blocking=False)
        raise ServeStartFailed(f"the Serve application's replicas were not running within {START_TIMEOUT_S:g} s "
                               f"(RAYBIG_SERVE_START_TIMEOUT_S); does the cluster have the CPUs that "
                               f"serve.replicas x serve.cpus_per_replica ask for?") from None
    except RuntimeError as err:  # DEPLOY_FAILED: a replica raised while loading its model
        raise ServeStartFailed(str(err)) from err
    return f"http://{host}:{port}"


def stop(on_cluster: bool) -> None:
    """Take raybig's application down, leaving Serve itself to the Ray it runs on.

    On a cluster, Serve may hold other applications, and a stopped job gets 3 s before SIGKILL: ask for the
    deletion and go. On the embedded Ray, wait for the replicas to finish their requests; the Ray's own
    shutdown then ends Serve's controller and proxy (serve.shutdown() has the controller kill itself
    mid-call, which Ray reports on the terminal as a failed task)."""
    serve.delete(APP_NAME, _blocking=not on_cluster)


def direct_urls(host: str) -> list[str]:
    """The replicas' own HTTP addresses (Serve's direct ingress); the proxy's when Serve runs without it.

    A replica listens on the host Serve was started with (`host`), on the port Serve gave it (30000+);
    the node's address stands in when that host is every interface."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name=APP_NAME))
    every_interface = host in ("0.0.0.0", "::")
    return [f"http://{t.ip if every_interface else host}:{t.port}" for g in groups
            if g.protocol == RequestProtocol.HTTP and g.app_name == APP_NAME for t in g.targets]
