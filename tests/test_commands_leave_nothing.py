"""`raybig run` and `raybig serve` as a user runs them, in their own processes: when they exit, nothing of
the Ray they started is left running (the sweep's case is in test_sweep_ray.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import processes_left, spec_dict

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def command(*args, mark: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raybig", *args], text=True,
                            env={**os.environ, "RAYBIG_COMMAND_MARK": mark}, **kwargs)


@pytest.fixture(scope="module")
def trained(no_ray_in_this_process, tmp_path_factory):
    """A one-epoch run made by `raybig run`, with the processes left behind once it exited."""
    tmp = tmp_path_factory.mktemp("commands")
    raw = spec_dict(tmp, name="exits", train={"epochs": 1, "batch_size": 64, "seed": 0})
    (tmp / "exits.yaml").write_text(yaml.safe_dump(raw))
    mark = f"run-{os.getpid()}-{time.time_ns()}"
    proc = command("run", str(tmp / "exits.yaml"), "--num-cpus", "2", mark=mark,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=240)
    return tmp / "runs" / "exits", proc.returncode, out + err, processes_left(mark)


def test_raybig_run_leaves_no_ray_process(trained):
    root, code, output, left = trained
    assert code == 0, output
    assert (root / "model.safetensors").is_file()
    assert left == []


def test_raybig_serve_stopped_by_sigterm_leaves_no_ray_process(trained):
    root = trained[0]
    mark = f"serve-{os.getpid()}-{time.time_ns()}"
    proc = command("serve", str(root), "--port", "8437", "--num-cpus", "2", "--profile-startup", mark=mark,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180  # it prints its routes once its replicas are up, then serves until Ctrl-C
        while not any(line.startswith("models:") for line in lines) and proc.poll() is None:
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        assert proc.poll() is None, "".join(lines)
        # at once, as `raybig jobs stop` or Kubernetes would: a stop as soon as the routes show takes it all down
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:  # a failed check must not leave a second Ray running into later tests
            proc.kill()
            proc.wait(timeout=60)
    assert processes_left(mark) == []
    reader.join(timeout=10)
    output = "".join(lines)  # --profile-startup: where start-up went, printed before the routes, then teardown
    table = output[output.index("where start-up went"):output.index("models:")]
    for phase in ("Ray start or connect", "replicas ready", "first request", "total"):
        assert phase in table, output
    assert "teardown (Serve and Ray):" in output, output


def test_a_request_past_serve_request_timeout_s_gets_408_and_the_server_goes_on(no_ray_in_this_process, tmp_path):
    """serve.request_timeout_s reaches Serve's proxy: a request the model holds longer is answered 408."""
    from multiproc import run_local

    raw = spec_dict(tmp_path, name="slow", model={"kind": "python", "factory": "slow_model:build",
                                                 "code": [str(Path(__file__).parent / "data")]},
                    train={"epochs": 1, "batch_size": 64, "seed": 0},
                    serve={"request_timeout_s": 2, "batch_wait_ms": 0, "port": 8438})
    run_local(raw, tmp_path / "runs" / "slow")
    (tmp_path / "runs" / "slow" / "spec.yaml").write_text(yaml.safe_dump(raw))
    mark = f"serve-{os.getpid()}-{time.time_ns()}"
    proc = command("serve", str(tmp_path / "runs" / "slow"), "--trust-code", "--num-cpus", "2", mark=mark,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()

    def predict(first_pixel: float) -> int:
        body = json.dumps({"inputs": [[first_pixel] + [0.0] * 63]}).encode()
        request = urllib.request.Request("http://127.0.0.1:8438/v1/models/slow/predict", data=body,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("models:") for line in lines) and proc.poll() is None:
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        assert predict(0.0) == 200, "".join(lines)
        assert predict(123.0) == 408  # the model takes 6 s over it; the spec's timeout is 2 s
        statuses = []
        deadline = time.monotonic() + 60  # the replica finishes the abandoned batch, then answers again
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, statuses
            statuses.append(predict(0.0))
        assert set(statuses) <= {200, 408}, statuses
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert processes_left(mark) == []


def test_raybig_up_keeps_a_ray_that_run_attaches_to_and_down_ends_it(no_ray_in_this_process, tmp_path):
    """`raybig up` starts a local Ray that outlives it; `raybig run` trains on it (printing where its time
    went) and leaves it running; `raybig down` ends all of it."""
    env = {k: v for k, v in os.environ.items() if k != "RAYBIG_NO_WARM_RAY"}
    env["RAYBIG_CACHE"] = str(tmp_path / "cache")  # its own record of the warm Ray, whatever else runs here
    raw = spec_dict(tmp_path, name="warm", train={"epochs": 1, "batch_size": 64, "seed": 0},
                    parallelism={"data": 2})
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(raw))
    up_mark, run_mark = (f"{what}-{os.getpid()}-{time.time_ns()}" for what in ("up", "run"))

    def raybig(*args, mark):
        return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, timeout=240,
                              env={**env, "RAYBIG_COMMAND_MARK": mark})

    try:
        up = raybig("up", "--num-cpus", "2", mark=up_mark)
        assert up.returncode == 0 and up.stdout.startswith("up: local Ray at 127.0.0.1:"), up.stdout + up.stderr
        again = raybig("up", mark=up_mark)
        assert again.stdout.startswith("already up:"), again.stdout + again.stderr
        assert processes_left(up_mark, within_s=0), "raybig up returned with nothing of its Ray left running"

        run = raybig("run", str(tmp_path / "warm.yaml"), "--profile-startup", mark=run_mark)
        assert run.returncode == 0, run.stdout + run.stderr
        assert (tmp_path / "runs" / "warm" / "model.safetensors").is_file()
        table = run.stderr[run.stderr.index("where the time went"):]
        for phase in ("ray: attached", "rank processes up", "first step", "ray: disconnect", "overhead"):
            assert phase in table, table
        assert "ray: started" not in table
        assert processes_left(run_mark, within_s=5) == []  # the run started no Ray of its own
        assert processes_left(up_mark, within_s=0)  # and left the warm one running
    finally:
        down = raybig("down", mark=up_mark)
    assert down.stdout.strip() == "down", down.stdout + down.stderr
    assert processes_left(up_mark) == []
    assert raybig("down", mark=up_mark).stdout.startswith("no local Ray")
