"""Where Ray comes from: an embedded local Ray (the default) or a running cluster at an address."""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager

# Serve's throughput profile: fewer per-request logs and bookkeeping, and direct ingress (each ingress
# replica takes HTTP on its own port, 30000+, skipping the proxy hop), which raybig's serving relies on
# for speed (docs/benchmarks.md). Read by Serve's processes, so set before Ray starts.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
# A direct-ingress replica that stops keeps its port open 30 s by default, for a cloud load balancer to
# deregister it; a Ray that raybig starts has none in front, and every Ctrl-C or demo then hung 30 s.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


def embedded_cpus(num_cpus: float | None) -> float:
    return float(num_cpus) if num_cpus else float(os.cpu_count() or 1)


@contextmanager
def ray_session(address: str | None = None, num_cpus: float | None = None, verbose: bool = False):
    """Join the Ray at `address`; else attach to the warm local Ray of `raybig up` when it runs; else start
    (and afterwards stop) an embedded one. A Ray this process already runs is reused. Yields how:
    "joined", "attached", "started" or "reused".

    `address="local"` matters: a bare ray.init() would try to join whatever cluster
    /tmp/ray/ray_current_cluster names, even a dead one. No dashboard: it costs start-up time and
    memory, and nothing of raybig's needs it (sweeps free their trials' resources through Tune).
    """
    import ray

    if ray.is_initialized():
        yield "reused"
        return
    kwargs = dict(include_dashboard=False, log_to_driver=verbose,
                  logging_level=logging.INFO if verbose else logging.WARNING)
    warm = None if address else warm_ray()
    if address or warm:
        if warm:
            _local_head_token()
        ray.init(address=address or warm["gcs"], **kwargs)
        how = "joined" if address else "attached"
    else:
        ray.init(address="local", num_cpus=int(embedded_cpus(num_cpus)), **kwargs)
        how = "started"
    try:
        yield how
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- the warm local Ray
def _warm_state():
    from raybig.data.datasets import cache_dir

    return cache_dir() / "local-ray.json"


def warm_ray() -> dict | None:
    """The warm local Ray `raybig up` started, while it runs ({"gcs", "num_cpus", "pid", ...}), else None.
    RAYBIG_NO_WARM_RAY=1 ignores it (a command then starts its own)."""
    from raybig.procs import running

    if os.environ.get("RAYBIG_NO_WARM_RAY") == "1":
        return None
    return running(_warm_state())


def warm_up(num_cpus: float | None = None, num_gpus: int | None = None, spare_ranks: int = 2,
            timeout: float = 120) -> tuple[dict, bool]:
    """`raybig up`: `ray start --head --block` on loopback, in a process group of its own, with no dashboard
    (like the embedded Ray) and Ray's token auth, and `spare_ranks` rank processes warmed for the runs that
    attach (raybig.train.spares). Returns its record and whether it was already up."""
    import socket
    import sys
    import time
    from pathlib import Path

    from raybig.errors import SpecError
    from raybig.procs import end_group, running, start_group

    state = _warm_state()
    info = running(state)
    if info is not None:
        return info, True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = int(embedded_cpus(num_cpus))
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats",
           *([f"--num-gpus={num_gpus}"] if num_gpus is not None else [])]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc, info = start_group(cmd, state, env, {"gcs": f"127.0.0.1:{port}", "num_cpus": cpus})
    log = Path(info["log"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            state.unlink(missing_ok=True)
            raise SpecError(f"ray start exited with {proc.returncode}; see {log}", "up")
        if "Ray runtime started" in log.read_text(errors="replace"):
            try:
                info["spare_ranks"] = _warm_spares(info, spare_ranks, timeout) if spare_ranks else 0
            except Exception as err:  # a head whose spares never came is not left running
                end_group(state)
                raise SpecError(f"the local Ray's spare ranks did not start ({err}); see {log}", "up") from None
            state.write_text(json.dumps(info))
            return info, False
        time.sleep(0.2)
    end_group(state)
    raise SpecError(f"the local Ray did not start within {timeout:.0f} s; see {log}", "up")


def _warm_spares(info: dict, count: int, timeout: float) -> int:
    from raybig.train.spares import start_pool

    _local_head_token()
    with ray_session(info["gcs"]):
        return start_pool(count, timeout)


def _local_head_token() -> None:
    """A head `raybig up` started has token auth on: take the token it left, as ray.init does for
    address="auto" (an explicit address never does)."""
    from ray._private.authentication import authentication_token_setup as setup

    said = logging.getLogger(setup.__name__)
    level = said.level
    said.setLevel(logging.ERROR)  # its warning that token auth is on: raybig turned it on on purpose
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        said.setLevel(level)


def warm_down() -> bool:
    """`raybig down`: end the warm local Ray's process group; False when none was running."""
    from raybig.procs import end_group

    return end_group(_warm_state())


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def logs_dir() -> str | None:
    """Where this Ray node keeps the workers' logs (they are not echoed to the terminal unless --verbose)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path() if _global_node is not None else None
    except (ImportError, AttributeError):
        return None
