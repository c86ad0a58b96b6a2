"""`raybig run` and `raybig serve` as a user runs them, in their own processes: when they exit, nothing of
the Ray they started is left running (the sweep's case is in test_sweep_ray.py)."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import processes_left, spec_dict

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def no_ray_in_this_process():
    import ray

    if ray.is_initialized():
        ray.shutdown()  # each command below starts its own Ray; never two at once


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
    proc = command("serve", str(root), "--port", "8437", "--num-cpus", "2", mark=mark,
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
