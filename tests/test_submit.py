"""A real `ray start --head --block` on loopback, in its own process group, started and stopped with
`raybig cluster up/down`; jobs submitted through Ray Job Submission with raybig (and once with the stock
`ray job submit`), a model store in an object store (an S3-compatible server on loopback), token auth."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from raybig.clusterspec import load_cluster
from raybig.errors import SpecError
from s3server import s3_bucket

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
# Not Ray's defaults (6379, 8265, 10001), nor clusters/local.yaml's, so this head collides with no other
HEAD = {"port": 6393, "dashboard_port": 8293, "client_server_port": 23093, "num_cpus": 2}
ADDRESS = f"http://127.0.0.1:{HEAD['dashboard_port']}"
SERVE_PORT = 8393


def raybig(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


def job_id_of(proc) -> str:
    found = re.search(r"submitted: (\S+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return found.group(1)


@pytest.fixture(scope="module")
def s3():
    with s3_bucket() as uri:
        yield uri


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3):
    """The head, up for the whole module; it inherits the S3 credentials, as a cloud node has its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # one Ray at a time: the session's local Ray comes back for later modules
    tmp = tmp_path_factory.mktemp("cluster")
    ray_tmp = tempfile.mkdtemp(prefix="rbt", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    cluster_file = tmp / "test-cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({
        "name": "raybig-test", "store": str(tmp / "store"), "head": {**HEAD, "temp_dir": ray_tmp}}))
    cache = {"RAYBIG_CACHE": str(tmp / "cache")}
    up = raybig("cluster", "up", str(cluster_file), env=cache)
    assert up.returncode == 0, up.stdout + up.stderr
    pgid = int(re.search(r"process group (\d+)", up.stdout).group(1))
    try:
        yield {"file": str(cluster_file), "store": tmp / "store", "pgid": pgid, "tmp": tmp}
    finally:
        down = raybig("cluster", "down", str(cluster_file), env=cache)
        still_up = _group_alive(pgid)
        if still_up:
            os.killpg(pgid, signal.SIGKILL)  # only the group this test started
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert down.returncode == 0 and "down" in down.stdout, down.stdout + down.stderr
        assert not still_up, "raybig cluster down left the head's process group running"


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_a_spec_trains_on_the_cluster_into_an_object_store_is_pulled_back_and_served_from_it(head, s3):
    import torch

    from raybig.data.datasets import load
    from raybig.spec import load_spec
    from raybig.train.checkpoint import load_trained_model

    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--store", s3,
                  "--set", "train.epochs=2", "--set", f"serve.port={SERVE_PORT}", "--follow", "--profile-startup")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # where the time went: here (connect, upload, the job), and the job's own phases, in its logs
    here = proc.stderr[proc.stderr.index("where the time went (here)"):]
    for phase in ("connect to the cluster", "upload the working directory", "the job on the cluster", "total"):
        assert phase in here, here
    job_table = proc.stdout[proc.stdout.index("where the time went"):]
    assert "first step" in job_table and "overhead" in job_table, job_table
    job_id = job_id_of(proc)
    assert re.fullmatch(r"digits-mlp-\d{8}-\d{6}-[0-9a-f]{4}", job_id)
    assert f"{job_id}: SUCCEEDED" in proc.stdout
    assert "done: val accuracy" in proc.stdout  # the job's own output, streamed

    pulled = raybig("pull", "digits-mlp", "--store", s3, "--to", str(head["tmp"] / "local"))
    assert pulled.returncode == 0, pulled.stderr
    run = head["tmp"] / "local" / "digits-mlp"
    model, info = load_trained_model(run)
    assert info["epoch"] == 2 and info["metrics"]["val_accuracy"] > 0.8
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2]
    assert yaml.safe_load((run / "spec.yaml").read_text())["output"]["dir"] == s3
    assert (run / "curves.png").is_file() and (run / "checkpoints" / "epoch-0002" / "meta.json").is_file()

    # served straight from the object store: each replica fetches the weights itself
    served = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--store", s3, "--command", "serve")
    assert served.returncode == 0, served.stdout + served.stderr
    sample = load(load_spec(ROOT / "jobs" / "digits_mlp.yaml").data).val.x[:4]
    reply = query_until_up(f"http://127.0.0.1:{SERVE_PORT}/v1/models/digits-mlp/predict", sample.tolist())
    raybig("jobs", "stop", job_id_of(served), "--cluster", head["file"])
    assert reply is not None, "the model served from the object store never answered"
    with torch.no_grad():
        expected = model(torch.as_tensor(sample)).argmax(-1).tolist()
    assert [p["label"] for p in reply["predictions"]] == expected

    listed = raybig("jobs", "list", "--cluster", head["file"])
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = raybig("jobs", "status", job_id, "--address", ADDRESS)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = raybig("jobs", "logs", job_id, "--cluster", head["file"])
    assert logs.returncode == 0 and "done: val accuracy" in logs.stdout


def test_a_sweep_is_submitted_like_a_run(head):
    import pandas as pd

    proc = raybig("submit", "jobs/digits_sweep.yaml", "--cluster", head["file"], "--command", "sweep",
                  "--set", "train.epochs=1", "--set", "parallelism.data=1", "--set", "sweep.trials=2",
                  "--set", "sweep.max_concurrent=1", "--set", "sweep.scheduler=fifo", "--follow")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "best: trial" in proc.stdout  # the job's own output, streamed
    run = head["store"] / "digits-sweep"
    results = pd.read_csv(run / "sweep" / "results.csv")
    assert len(results) == 2 and set(results.status) == {"completed"}
    assert (run / "model.safetensors").is_file() and yaml.safe_load((run / "spec.yaml").read_text())["name"] == \
        "digits-sweep"


def test_a_spec_of_ones_own_model_trains_on_the_cluster_from_the_code_the_job_ships(head):
    proc = raybig("submit", "jobs/own_model.yaml", "--cluster", head["file"], "--set", "train.epochs=1",
                  "--set", "parallelism.data=1", "--follow")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout and "done: val accuracy" in proc.stdout
    info = json.loads((head["store"] / "own-resmlp" / "model.json").read_text())
    assert info["kind"] == "python" and info["model"]["factory"] == "resmlp:build"
    # the job imported the copy of examples/own_model that Ray unpacked for it, not this checkout's
    code = Path(info["model"]["code"][0])
    assert code.name == "own_model" and not code.is_relative_to(ROOT)


def query_until_up(url: str, inputs: list, seconds: float = 150):
    """POST to a model that a just-submitted job is still starting; None if it never answers."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            request = urllib.request.Request(url, data=json.dumps({"inputs": inputs}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            time.sleep(2)
    return None


def still_answers(url: str, inputs: list, seconds: float = 60) -> bool:
    """Whether a served model keeps answering for `seconds` (False as soon as it stops)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            request = urllib.request.Request(url, data=json.dumps({"inputs": inputs}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10):
                time.sleep(1)
        except OSError:  # refused, or 404 from Serve's proxy once the application is gone
            return False
    return True


def test_a_long_job_is_stopped(head):
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--set", "train.epochs=2000",
                  "--set", "name=long-job")
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc)
    deadline = time.time() + 120
    while time.time() < deadline:
        if "RUNNING" in raybig("jobs", "status", job_id, "--cluster", head["file"]).stdout:
            break
        time.sleep(1)
    stopped = raybig("jobs", "stop", job_id, "--cluster", head["file"])
    assert stopped.returncode == 0 and f"{job_id}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert f"{job_id}: STOPPED" in raybig("jobs", "status", job_id, "--address", ADDRESS).stdout


def test_the_stock_ray_job_submit_runs_a_spec_and_raybig_serves_the_run_on_the_cluster(head):
    # the command docs/clusters.md gives, with this test's head and store
    ray_cli = str(Path(sys.executable).with_name("ray"))
    excludes = json.dumps({"excludes": ["runs/", ".venv/", ".git/", "**/__pycache__/"]})
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", ADDRESS, "--working-dir", str(ROOT), "--runtime-env-json", excludes,
         "--", "python", "-m", "raybig", "run", "jobs/digits_mlp.yaml", "--address", "auto",
         "--set", f"output.dir={head['store']}", "--set", "name=stock-submit", "--set", "train.epochs=1",
         "--set", f"serve.port={SERVE_PORT}"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "RAY_AUTH_MODE": "token"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout.lower()
    run = head["store"] / "stock-submit"
    assert (run / "model.safetensors").is_file() and json.loads((run / "model.json").read_text())["epoch"] == 1

    # the same spec, `--command serve`: a job that serves the run it trained, from the store
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--command", "serve",
                  "--set", "name=stock-submit", "--set", "serve.port=1")
    assert proc.returncode == 2 and "only --set name=" in proc.stderr  # serve takes the run as trained
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], "--command", "serve",
                  "--set", "name=stock-submit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = job_id_of(proc)
    from raybig.data.datasets import load
    from raybig.spec import load_spec

    sample = load(load_spec(ROOT / "jobs" / "digits_mlp.yaml").data).val.x[:2].tolist()
    reply = query_until_up(f"http://127.0.0.1:{SERVE_PORT}/v1/models/stock-submit/predict", sample)
    status = raybig("jobs", "status", job_id, "--cluster", head["file"]).stdout
    stopped = raybig("jobs", "stop", job_id, "--cluster", head["file"])
    assert reply is not None, f"the served model never answered; {status}"
    assert len(reply["predictions"]) == 2 and "RUNNING" in status
    assert stopped.returncode == 0
    # stopping the job takes its application down with it: the model no longer answers
    assert still_answers(f"http://127.0.0.1:{SERVE_PORT}/v1/models/stock-submit/predict", sample) is False


def test_unreachable_address_is_one_clear_line():
    proc = raybig("jobs", "list", "--address", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "cannot reach a Ray cluster at http://127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_token_is_one_clear_line(head, tmp_path):
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": ""}
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--cluster", head["file"], env=env)
    assert proc.returncode == 2 and "no Ray auth token" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_wrong_token_is_refused_and_the_right_one_from_a_file_is_taken(head, tmp_path):
    proc = raybig("jobs", "list", "--cluster", head["file"], env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert proc.returncode == 2 and "refused the auth token" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    token_file = tmp_path / "token"
    token_file.write_text((Path.home() / ".ray" / "auth_token").read_text())
    cluster = yaml.safe_load(Path(head["file"]).read_text())
    cluster["auth"] = {"token_path": str(token_file)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cluster))
    proc = raybig("jobs", "list", "--cluster", str(tmp_path / "c.yaml"), env={"HOME": str(tmp_path / "elsewhere")})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("content, field", [
    ("name: x\nstore: relative/path\nhead: {}\n", "store"),
    ("name: x\nstore: /s\nhead: {cpus: 2}\n", "head.cpus"),
    ("name: x\nstore: /s\n", "address"),
    ("name: x\nstore: /s\nhead: {host: 0.0.0.0}\n", "head.host"),
    ("name: x\nstore: /s\nhead: {port: http}\n", "head.port"),
    ("name: x\nstore: /s\naddress: 127.0.0.1:8265\n", "address"),
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


def test_entrypoints_quote_every_piece():
    from raybig.submit import entrypoint, entrypoint_args

    line = entrypoint("run", "jobs/x.yaml", "x", "/models", ["name=a; rm -rf /", "train.epochs=3"])
    assert line == ("python -m raybig run jobs/x.yaml --address auto --set output.dir=/models "
                    "--set 'name=a; rm -rf /' --set train.epochs=3")
    assert entrypoint_args("sweep", "jobs/x.yaml", "x", "/models", [])[3:6] == ["sweep", "jobs/x.yaml", "--address"]
    with pytest.raises(SpecError, match="path"):
        entrypoint_args("sweep", "jobs/x.yaml", "x", "s3://b/p", [])
    assert entrypoint_args("serve", "jobs/x.yaml", "x", "/models", ["name=x"]) == \
        ["python", "-m", "raybig", "serve", "/models/x", "--address", "auto"]
    assert entrypoint_args("serve", "jobs/x.yaml", "x", "s3://b/p?endpoint_override=h:1", []) == \
        ["python", "-m", "raybig", "serve", "s3://b/p/x?endpoint_override=h:1", "--address", "auto"]
    with pytest.raises(SpecError, match="not one of"):
        entrypoint_args("train", "jobs/x.yaml", "x", "/models", [])


def test_submit_refuses_a_command_this_raybig_lacks(tmp_path):
    from raybig.cli import _command_names

    assert {"run", "serve"} <= _command_names()
    proc = raybig("submit", "jobs/digits_mlp.yaml", "--address", "http://127.0.0.1:9", "--store", "/m",
                  "--command", "train", env={"RAY_AUTH_TOKEN": "t"})
    assert proc.returncode == 2 and "no `train` command" in proc.stderr


def test_serving_a_python_model_on_a_cluster_needs_trust_code():
    """Without --trust-code the submission is refused before the cluster is contacted (nothing listens on
    port 9); with it, the job's serve command carries the flag."""
    from raybig.submit import entrypoint_args

    proc = raybig("submit", "jobs/own_model.yaml", "--address", "http://127.0.0.1:9", "--store", "/m",
                  "--command", "serve", env={"RAY_AUTH_TOKEN": "t"})
    assert proc.returncode == 2 and "--trust-code" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert entrypoint_args("serve", "jobs/x.yaml", "x", "/models", [], trust_code=True)[-1] == "--trust-code"
