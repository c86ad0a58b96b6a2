"""Where Ray comes from: an embedded local Ray (the default) or a running cluster at an address."""
from __future__ import annotations

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
    """Start (and afterwards stop) an embedded Ray, or join one; reuse a Ray this process already runs.

    `address="local"` matters: a bare ray.init() would try to join whatever cluster
    /tmp/ray/ray_current_cluster names, even a dead one. No dashboard: it costs start-up time and
    memory, and nothing of raybig's needs it (sweeps free their trials' resources through Tune).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = dict(include_dashboard=False, log_to_driver=verbose,
                  logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=int(embedded_cpus(num_cpus)), **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


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
