import os

import pytest

# A `raybig up` on this machine must not take the tests' commands (the test of `raybig up` asks for it)
os.environ.setdefault("RAYBIG_NO_WARM_RAY", "1")
# Runs are not tracked in MLflow unless a test asks (tests/test_registry.py): each would set up a store
os.environ.setdefault("RAYBIG_TRACKING", "off")

import raybig.cluster  # noqa: E402,F401  (sets raybig's Serve settings before the session's Ray starts)

RAY_CPUS = 4  # two workers, a spare, and room for Ray Data; tests never start a second Ray


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray, started once and shared by every test that asks (it takes seconds to start).

    Module-scoped on purpose: a test module that needs no in-process Ray (one that drives a separate
    `ray start --head` cluster) may shut it down first, and the next module that asks starts it again,
    so two Ray clusters never run at once.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture(scope="module")
def no_ray_in_this_process():
    """For a module whose commands start (or attach to) a Ray of their own: never two at once."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_the_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def spec_dict(tmp_path, **sections) -> dict:
    """A small digits MLP job writing into tmp_path; sections replace the defaults whole."""
    base = {
        "name": "t",
        "model": {"kind": "mlp", "hidden": [64]},
        "data": {"source": "digits"},
        "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adam", "lr": 2e-3}, "seed": 0},
        "parallelism": {"data": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    base.update(sections)
    return base


def processes_left(mark: str, within_s: float = 30.0, named: str | tuple[str, ...] = "") -> list[str]:
    """Processes whose environment carries RAYBIG_COMMAND_MARK=`mark` (a command started with it, and the Ray it
    started: GCS, raylet and workers inherit the variable), and whose name starts with `named` (one of), still alive
    after up to `within_s`."""
    import time

    import psutil

    needle = f"RAYBIG_COMMAND_MARK={mark}".encode()
    deadline = time.monotonic() + within_s
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and proc.status() != psutil.STATUS_ZOMBIE and \
                            proc.name().startswith(named):
                        left.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
            except (OSError, psutil.Error):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
