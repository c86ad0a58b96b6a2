"""A real Serve application on loopback, real HTTP: predictions, versions, batching, bad input, auth."""
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import schemathesis
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from raybig.data.datasets import load
from raybig.spec import parse_spec
from raybig.train.checkpoint import load_trained_model
from test_optim import train_locally

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
PORT = 8431
TOKEN = "s3cret-test-token"


def with_serve_section(store, **serve):
    """Give a trained run a serve section, as a user would in the job spec."""
    path = store.root / "spec.yaml"
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    raw = raw or {"name": "x", "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits"}}
    raw["serve"] = {"cpus_per_replica": 0.5, "max_batch_size": 16, "batch_wait_ms": 20,
                    "auth_token_env": "RAYBIG_TEST_TOKEN", "request_timeout_s": 45, **serve}
    path.write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from raybig.serve.app import entry_from_arg, start

    monkeypatch_module.setenv("RAYBIG_TEST_TOKEN", TOKEN)  # read by `start` below, which hands the token to the replicas
    out = tmp_path_factory.mktemp("serve")
    _, v1 = train_locally(out / "v1", epochs=2, optimizer={"name": "adam", "lr": 2e-3})
    _, v2 = train_locally(out / "v2", epochs=1, seed=1, optimizer={"name": "sgd", "lr": 0.1})
    lm_spec = parse_spec({"name": "tiny-lm", "model": {"kind": "transformer", "task": "lm", "dim": 32, "heads": 2,
                                                          "layers": 1},
                          "data": {"source": "text", "seq_len": 16, "max_chars": 4000}, "train": {"epochs": 1}})
    lm_store, _ = train_here(lm_spec, out / "lm", batch_size=64)
    qa_store, regression_store = bpe_lm(out), regression(out)
    for store in (v1, v2, lm_store, qa_store, regression_store):
        with_serve_section(store)
    from raybig.lifecycle.compress import compressed_run

    compressed_run(v1.root, out / "v1-int8", "quantize")  # raybig compress: a run like any other, int8 inside
    entries = [entry_from_arg(f"digits:int8={out / 'v1-int8'}"), entry_from_arg(f"digits:v2={v2.root}"),
               entry_from_arg(f"digits:v1={v1.root}"),
               entry_from_arg(str(lm_store.root)), entry_from_arg(str(qa_store.root)),
               entry_from_arg(str(regression_store.root))]
    url = start(entries, "127.0.0.1", PORT)
    yield {"url": url, "v1": v1.root, "v2": v2.root, "int8": out / "v1-int8", "qa": qa_store.root, "regression": regression_store.root}
    serve.shutdown()


def train_here(spec, store_dir, batch_size=32):
    """`spec` trained by the one loop in this process into a run at store_dir, with its spec.yaml."""
    from raybig.data.loader import MemorySource
    from raybig.train.checkpoint import RunStore
    from raybig.train.loop import WorkerEnv, fit

    bundle = load(spec.data)
    store = RunStore(store_dir)
    fit(spec, bundle.meta, WorkerEnv(0, 1, torch.device("cpu"),
                                     MemorySource(bundle.train.x, bundle.train.y, batch_size, 0, 1, 0),
                                     MemorySource(bundle.val.x, bundle.val.y, batch_size, 0, 1, 0)), store)
    store.write_spec(spec.to_yaml())
    return store, bundle


def regression(out):
    """An MLP predicting scikit-learn's diabetes progression from a CSV's ten columns."""
    from raybig.data import samples

    samples.write_tables(out / "tables", samples.docstrings())
    spec = parse_spec({"name": "diabetes", "model": {"kind": "mlp", "hidden": [16]},
                       "data": {"source": "csv", "path": str(out / "tables" / "diabetes.csv"), "label": "progression",
                                "task": "regression"}, "train": {"epochs": 2}})
    return train_here(spec, out / "diabetes")[0]


def bpe_lm(out):
    """A language model on prompt/completion rows with a BPE tokenizer, kept in its run as `raybig run` keeps it."""
    from raybig.data import samples
    from raybig.train.runner import keep_tokenizer

    samples.write_text(out / "data", samples.docstrings())
    spec = parse_spec({"name": "qa-lm", "model": {"kind": "transformer", "task": "lm", "dim": 32, "heads": 2,
                                                   "layers": 1},
                       "data": {"source": "jsonl", "path": str(out / "data" / "qa.jsonl"), "format": "prompt_completion",
                                "seq_len": 32, "tokenizer": {"train": "bpe", "vocab_size": 400}},
                       "train": {"epochs": 3, "batch_size": 32}})
    store, bundle = train_here(spec, out / "qa")
    keep_tokenizer(store, bundle.meta)
    return store


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def call(url, body=None, raw=None, headers=None, token=TOKEN, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"content-type": "application/json", **(headers or {})}
    if token:
        h["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=h, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def val_samples(n=20):
    spec = parse_spec({"name": "x", "model": {"kind": "mlp"}, "data": {"source": "digits"}})
    bundle = load(spec.data)
    return bundle.val.x[:n], bundle.val.y[:n]


def test_predictions_equal_the_local_forward_pass(server):
    x, _ = val_samples()
    status, reply = call(f"{server['url']}/v1/models/digits/predict?version=v1", {"inputs": x.tolist()})
    assert status == 200 and reply["version"] == "v1"
    model, _ = load_trained_model(server["v1"])
    with torch.no_grad():
        expected = torch.softmax(model(torch.as_tensor(x)), -1).numpy()
    got = np.array([p["probabilities"] for p in reply["predictions"]])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert [p["label"] for p in reply["predictions"]] == expected.argmax(1).tolist()


def test_a_quantized_run_is_served_as_any_run(server):
    x, _ = val_samples()
    status, reply = call(f"{server['url']}/v1/models/digits/predict?version=int8", {"inputs": x.tolist()})
    assert status == 200 and reply["version"] == "int8"
    model, info = load_trained_model(server["int8"])
    assert info["compression"]["method"] == "quantize"
    with torch.no_grad():
        expected = torch.softmax(model(torch.as_tensor(x)), -1).numpy()
    np.testing.assert_allclose([p["probabilities"] for p in reply["predictions"]], expected, atol=2e-6)
    v1 = call(f"{server['url']}/v1/models/digits/predict?version=v1", {"inputs": x.tolist()})[1]
    agree = np.mean([a["label"] == b["label"] for a, b in zip(reply["predictions"], v1["predictions"])])
    assert agree >= 0.9


def test_versions_default_query_and_header(server):
    x, _ = val_samples(5)
    url = f"{server['url']}/v1/models/digits/predict"
    default = call(url, {"inputs": x.tolist()})[1]
    by_query = call(url + "?version=v2", {"inputs": x.tolist()})[1]
    by_header = call(url, {"inputs": x.tolist()}, headers={"x-model-version": "v2"})[1]
    v1 = call(url + "?version=v1", {"inputs": x.tolist()})[1]
    assert default["version"] == "v1"  # the last version given is the default
    assert by_query["version"] == by_header["version"] == "v2"
    assert by_query["predictions"] == by_header["predictions"] != v1["predictions"]
    status, cards = call(f"{server['url']}/v1/models")
    assert status == 200
    assert {(c["name"], c["version"], c["default"]) for c in cards} >= {("digits", "v1", True), ("digits", "v2", False)}
    assert len({(c["replica"], c["replica_started"]) for c in cards}) == 1  # the one replica, holding every version
    from ray.serve.context import _get_global_client

    assert _get_global_client().http_config.request_timeout_s == 45  # the spec's serve.request_timeout_s


BAD = [
    ("malformed json", dict(raw=b'{"inputs": [[0.1, 0.2'), 422, "JSON"),
    ("wrong shape", dict(body={"inputs": [[0.0] * 63]}), 422, "shape"),
    ("wrong dtype", dict(body={"inputs": [["a"] * 64]}), 422, "numbers"),
    ("nan", dict(raw=b'{"inputs": [[NaN' + b', 0.0' * 63 + b']]}'), 422, "NaN"),
    ("infinity", dict(raw=b'{"inputs": [[Infinity' + b', 0.0' * 63 + b']]}'), 422, "infinity"),
    ("empty batch", dict(body={"inputs": []}), 422, "empty"),
    ("unknown field", dict(body={"inputs": [[0.0] * 64], "extra": 1}), 422, None),
    ("oversized", dict(body={"inputs": [[0.5] * 64] * 5000}), 413, "over the limit"),
    ("unknown model", dict(body={"inputs": [[0.0] * 64]}, path="nope"), 404, "no model named"),
    ("unknown version", dict(body={"inputs": [[0.0] * 64]}, query="?version=v9"), 404, "no version"),
    # 200 KB of brackets, well under the 1 MB limit: the standard JSON parser ran out of stack (a 500)
    ("nested brackets", dict(raw=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 422, "nested deeper"),
    ("no token", dict(body={"inputs": [[0.0] * 64]}, token=None), 401, "token"),
    ("wrong token", dict(body={"inputs": [[0.0] * 64]}, token="guess"), 401, "token"),
]


@pytest.mark.parametrize("case, kwargs, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_and_the_server_stays_healthy(server, case, kwargs, status, words):
    kwargs = dict(kwargs)
    path, query = kwargs.pop("path", "digits"), kwargs.pop("query", "")
    got, reply = call(f"{server['url']}/v1/models/{path}/predict{query}", **kwargs)
    assert got == status, reply
    assert reply.get("detail")
    if words:
        assert words in json.dumps(reply["detail"])
    ok, good = call(f"{server['url']}/v1/models/digits/predict", {"inputs": [[0.0] * 64]})
    assert ok == 200 and len(good["predictions"]) == 1


def test_concurrent_requests_are_batched(server):
    x, _ = val_samples(48)
    url = f"{server['url']}/v1/models/digits/predict?version=v2"
    before = {c["version"]: c["batching"] for c in call(f"{server['url']}/v1/models")[1] if c["name"] == "digits"}
    with ThreadPoolExecutor(max_workers=24) as pool:
        replies = list(pool.map(lambda row: call(url, {"inputs": [row.tolist()]}), x))
    assert all(status == 200 for status, _ in replies)
    after = {c["version"]: c["batching"] for c in call(f"{server['url']}/v1/models")[1] if c["name"] == "digits"}
    assert after["v2"]["requests"] - before["v2"]["requests"] == 48
    assert after["v2"]["largest_batch"] > 1  # several requests shared one forward pass


def test_replicas_answer_directly_without_the_proxy(server):
    """Serve's direct ingress (on under raybig's throughput profile): the replica's own port is the same app."""
    from raybig.serve.app import direct_urls

    urls = [u for u in direct_urls("127.0.0.1") if u != server["url"]]
    assert urls, "no direct-ingress address: is RAY_SERVE_THROUGHPUT_OPTIMIZED set before Ray starts?"
    x, _ = val_samples(3)
    status, reply = call(f"{urls[0]}/v1/models/digits/predict?version=v2", {"inputs": x.tolist()})
    via_proxy = call(f"{server['url']}/v1/models/digits/predict?version=v2", {"inputs": x.tolist()})[1]
    assert status == 200 and reply == via_proxy
    assert call(f"{urls[0]}/v1/models/digits/predict", {"inputs": x.tolist()}, token=None)[0] == 401


def test_language_model_generates(server):
    url = f"{server['url']}/v1/models/tiny-lm/generate"
    status, reply = call(url, {"prompt": "def ", "max_new_tokens": 12, "temperature": 0.8, "seed": 1})
    assert status == 200 and len(reply["text"]) == 12
    assert call(url, {"prompt": "def ", "max_new_tokens": 12, "temperature": 0.8, "seed": 1})[1]["text"] == reply["text"]
    status, reply = call(url, {"prompt": "\u2603 snowman"})
    assert status == 422 and "never saw" in reply["detail"]
    assert call(f"{server['url']}/v1/models/digits/generate", {"prompt": "x"})[0] == 422


def test_a_model_with_its_own_tokenizer_completes_as_its_greedy_decoding_does(server):
    """The run's tokenizer.json turns the prompt into ids and the ids back into text; the end-of-text token
    ends the completion (finish_reason stop), as it ended each training document."""
    from tokenizers import Tokenizer

    model, info = load_trained_model(server["qa"])
    tokenizer = Tokenizer.from_file(str(server["qa"] / "tokenizer.json"))
    eos = tokenizer.token_to_id(info["data"]["eos_token"])
    for prompt in ("What does heapq.heappush do?\n", "What does textwrap.dedent do?\n", "Wha"):
        ids, new = tokenizer.encode(prompt, add_special_tokens=False).ids, []
        while len(new) < 40:
            with torch.no_grad():
                token = int(model(torch.tensor([(ids + new)[-32:]]))[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
        status, reply = call(f"{server['url']}/v1/completions", {"model": "qa-lm", "prompt": prompt,
                                                                 "max_tokens": 40, "temperature": 0})
        assert status == 200, reply
        choice = reply["choices"][0]
        assert choice["text"] == tokenizer.decode(new)
        assert choice["finish_reason"] == ("stop" if len(new) < 40 else "length")
        assert reply["usage"]["prompt_tokens"] == len(ids)
    status, reply = call(f"{server['url']}/v1/models/qa-lm/generate", {"prompt": "\u2603 snowman", "max_new_tokens": 4})
    assert status == 200  # a byte-level tokenizer has a token for every text


@pytest.mark.parametrize("path", ["/v1/models/tiny-lm/generate", "/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_bodies_get_a_4xx_at_every_endpoint(server, path):
    status, reply = call(f"{server['url']}{path}", raw=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status in (400, 422) and (reply.get("detail") or reply["error"]["message"]), reply
    assert call(f"{server['url']}/healthz", token=None)[0] == 200


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server['url']}/openapi.json")


SERVED = {"predict": "digits", "generate": "tiny-lm"}  # a served model of the kind each path takes
POSTS = ["POST /v1/models/{name}/predict", "POST /v1/models/{name}/generate", "POST /v1/completions",
         "POST /v1/chat/completions"]
# (the GETs take no parameters: no request breaks their schema)
FUZZED = [("GET /healthz", "positive"), ("GET /v1/models", "positive")] + \
    [(operation, mode) for operation in POSTS for mode in ("positive", "negative")]


@pytest.mark.parametrize("operation, mode", FUZZED)
def test_any_request_gets_a_status_and_body_the_openapi_document_states(server, api_schema, operation, mode):
    """Requests generated from /openapi.json (valid by its schemas, or breaking them), each sent as generated and
    again at a model that exists: never a 5xx; only the status codes, content types and bodies it documents."""
    from hypothesis import given

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    headers = {"authorization": f"Bearer {TOKEN}"}
    kind = operation.rsplit("/", 1)[-1]
    documented = api_schema.find_operation_by_label(operation)
    assert operation.startswith("GET") or documented.body.items, "the document states no body to generate from"
    strategy = documented.as_strategy(schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def answers_as_documented(case):
        case.call_and_validate(headers=headers, checks=checks)
        if kind in SERVED:
            case.path_parameters = {**(case.path_parameters or {}), "name": SERVED[kind]}
        elif isinstance(case.body, dict) and "completions" in operation:
            case.body = {**case.body, "model": "tiny-lm"}
        else:
            return
        case.call_and_validate(headers=headers, checks=checks)

    answers_as_documented()
    assert call(f"{server['url']}/healthz", token=None)[0] == 200


# what the OpenAPI document does not describe: any path, method, query, header and body
SAFE = st.characters(min_codepoint=0x20, max_codepoint=0x7e)  # what HTTP/1.1 carries in a request line and headers
KNOWN = ["v1/models/digits/predict", "v1/models/tiny-lm/generate", "v1/completions", "v1/chat/completions",
         "v1/models", "healthz", "docs", "openapi.json", "v1/models/digits", "v1/models/tiny-lm/predict"]
paths = st.one_of(st.sampled_from(KNOWN), st.text(SAFE, max_size=60),
                  st.builds(lambda known, tail: f"{known}/{tail}", st.sampled_from(KNOWN), st.text(SAFE, max_size=20)))
header_names = st.one_of(st.sampled_from(["content-type", "authorization", "x-model-version", "accept",
                                          "content-encoding", "transfer-encoding", "x-request-id", "cookie"]),
                         st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-"), min_size=1, max_size=20))
header_values = st.one_of(st.sampled_from(["application/json", "text/plain", f"Bearer {TOKEN}", "Bearer", "gzip",
                                           "v1", "v2", "v9", "../v1", "%00", "a" * 2000]),
                          st.text(SAFE, max_size=80).map(str.strip))
bodies = st.one_of(st.none(), st.binary(max_size=300),
                   st.sampled_from([b'{"inputs": [[0.0]]}', b'{"prompt": "def ", "max_new_tokens": 2}', b"[]", b"{}"]))


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]), path=paths,
       query=st.text(SAFE, max_size=40), headers=st.dictionaries(header_names, header_values, max_size=5),
       body=bodies)
def test_any_path_method_query_header_or_body_gets_an_answer_below_500(server, method, path, query, headers, body):
    import http.client
    from urllib.parse import quote, urlsplit

    where = urlsplit(server["url"])
    target = "/" + quote(path, safe="/") + ("?" + quote(query, safe="=&") if query else "")
    if not any(k.lower() == "authorization" for k in headers) and len(headers) % 2 == 0:
        headers = {**headers, "authorization": f"Bearer {TOKEN}"}  # half the requests get past auth
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding") or body is None:
                connection.putheader(name, value)
        connection.putheader("content-length", str(len(body or b"")))
        connection.endheaders(body or b"")
        status = connection.getresponse().status
    finally:
        connection.close()
    assert status < 500, (method, target, headers, body)


def test_the_server_is_healthy_after_the_header_and_path_fuzz(server):
    status, _ = call(f"{server['url']}/healthz", token=None)
    assert status == 200
    x, _ = val_samples(2)
    assert call(f"{server['url']}/v1/models/digits/predict", {"inputs": x.tolist()})[0] == 200


def test_sampling_at_the_edges_of_its_ranges_picks_a_token():
    """top_p 5e-324 (0 in float32) kept no token, a temperature of 5e-324 made every logit NaN: both were a 500."""
    from raybig.serve.generation import Sampling, next_token

    logits = torch.tensor([1.0, 3.0, 2.0, 3.0 - 1e-7])
    for temperature, top_p in [(1.0, 5e-324), (5e-324, 1.0), (5e-324, 5e-324), (2.0, 1.0)]:
        token = next_token(logits, Sampling(1, temperature, top_p), torch.Generator().manual_seed(0))
        assert token in ((0, 1, 2, 3) if temperature == 2.0 else (1,))


def test_health_and_openapi(server):
    assert call(f"{server['url']}/healthz", token=None)[0] == 200
    status, doc = call(f"{server['url']}/openapi.json", token=None)
    assert status == 200 and "/v1/models/{name}/predict" in doc["paths"]
    predict = doc["paths"]["/v1/models/{name}/predict"]["post"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}  # {"detail": str}, what the server sends
    assert {code: r["content"]["application/json"]["schema"] for code, r in predict["responses"].items()
            if code != "200"} == {"401": error, "404": error, "413": error, "422": error}
    assert doc["components"]["schemas"]["ErrorResponse"]["properties"]["detail"]["type"] == "string"
    inputs = predict["requestBody"]["content"]["application/json"]["schema"]["properties"]["inputs"]
    assert inputs["minItems"] == 1  # an empty batch is refused, and the schema says so
    status, reply = call(f"{server['url']}/v1/models/digits/predict?version=", raw=b"[]")
    assert status == 422 and isinstance(reply["detail"], str)


def test_query_command_prints_predictions(server, tmp_path):
    x, y = val_samples(4)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.json").write_text(json.dumps({"inputs": x.tolist()}))
    np.savetxt(tmp_path / "x.csv", x.reshape(4, 64), delimiter=",")
    for name in ("x.npy", "x.json", "x.csv"):
        proc = subprocess.run([sys.executable, "-m", "raybig", "query", "digits", "--input", str(tmp_path / name),
                               "--url", server["url"], "--version", "v1"], capture_output=True, text=True,
                              timeout=60, env={**__import__("os").environ, "RAYBIG_TOKEN": TOKEN})
        assert proc.returncode == 0, proc.stderr
        assert "digits v1" in proc.stdout and proc.stdout.count("│") >= 4 * 3
    proc = subprocess.run([sys.executable, "-m", "raybig", "query", "digits", "--input", str(tmp_path / "x.npy"),
                           "--url", server["url"]], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in __import__("os").environ.items() if k != "RAYBIG_TOKEN"})
    assert proc.returncode == 2 and "401" in proc.stderr and "Traceback" not in proc.stderr


def _unknown_fields(value, schema, path="") -> list[str]:
    """Fields the CRD schema does not know (the API server's strict validation would refuse them)."""
    bad = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                bad.append(f"{path}.{key}")
            else:
                bad += _unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            bad += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return bad


def test_export_writes_a_serve_config_and_a_valid_rayservice(server, tmp_path):
    import jsonschema

    schema_path = __import__("pathlib").Path(__file__).resolve().parent / "data" / "kuberay" / "rayservice.v1.schema.json"
    proc = subprocess.run([sys.executable, "-m", "raybig", "serve", f"digits:v1={server['v1']}", "--export",
                           str(tmp_path), "--store-claim", "raybig-models"], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "RAYBIG_TEST_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((tmp_path / "serve_config.yaml").read_text())
    [application] = config["applications"]
    assert application["import_path"] == "raybig.serve.deploy:app"
    assert application["args"]["runs"] == [f"digits:v1=/models/{server['v1'].name}"]
    manifest = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == config
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(manifest, schema)
    assert _unknown_fields(manifest, schema) == []
    # the builder named in the config builds the same application here
    from raybig.serve.deploy import app as build

    assert build({"runs": [f"digits:v1={server['v1']}"]}) is not None


def test_a_regression_answers_with_values(server):
    model, _ = load_trained_model(server["regression"])
    x = np.random.default_rng(0).normal(0, 0.05, size=(5, 10)).astype(np.float32)
    status, reply = call(f"{server['url']}/v1/models/diabetes/predict", {"inputs": x.tolist()})
    assert status == 200, reply
    with torch.no_grad():
        expected = model(torch.as_tensor(x)).reshape(-1).tolist()
    assert [p["value"] for p in reply["predictions"]] == pytest.approx(expected, rel=1e-5)
    assert "label" not in reply["predictions"][0]
