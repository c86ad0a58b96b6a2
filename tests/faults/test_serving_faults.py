"""A replica SIGKILLed under load (benchmarks/serve_faults.py, shortened): `raybig serve` with 2 replicas keeps
answering through Serve's proxy, none past the spec's request timeout, and GET /v1/models shows the replica
that took the dead one's place."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import processes_left

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_faults.py"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_two_replicas_keep_answering_while_one_is_killed_and_replaced(no_ray_in_this_process):
    mark = f"serve-faults-{os.getpid()}-{time.time_ns()}"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "20", "--rate", "100", "--timeout", "5",
                           "--port", "8436"], capture_output=True, text=True, timeout=360,
                          env={**os.environ, "RAYBIG_COMMAND_MARK": mark})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # >= 99.9% answered, none past 5 s, the killed replica replaced
    requests, ok = map(int, re.search(r"(\d+) requests at .* (\d+) succeeded", out).groups())
    assert requests == 2000 and ok >= 1998, out
    assert "1 of 2 replicas SIGKILLed" in out and "new replica" in out and "not within" not in out, out
    slowest = float(re.search(r"slowest ([\d.]+) s", out).group(1))
    assert slowest <= 5, out
    assert processes_left(mark) == []
