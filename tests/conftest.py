import os

import pytest

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

RAY_CPUS = 4  # two workers, a spare, and room for Ray Data; tests never start a second Ray


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (it takes seconds to start)."""
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield
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
