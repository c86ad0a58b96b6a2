"""What each rank runs, under Ray Train or in a sweep trial's own worker group: find its data and its
progress channel, then the one loop."""
from __future__ import annotations

import torch


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point (`raybig run`): rank, device and streamed shards come from Ray Train."""
    import ray.train
    import ray.train.torch

    from raybig.data.datasets import DataMeta
    from raybig.data.loader import StreamSource
    from raybig.spec import JobSpec

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sources = None
    if config["loader"] == "stream":
        spec, meta = JobSpec.model_validate(config["spec"]), DataMeta(**config["meta"])
        batch, seed = spec.train.batch_size, spec.train.seed
        sources = tuple(StreamSource(ray.train.get_dataset_shard(split), config[f"{split}_rows"], batch, world, seed,
                                     meta.shape) for split in ("train", "val"))
    run_rank(config, rank, world, ray.train.torch.get_device(), report=ray.train.report, sources=sources)


def run_rank(config: dict, rank: int, world: int, device: torch.device, report=None, sources=None) -> None:
    """One rank of a run whose process group is already up. Without `sources` the rank takes its slice of
    the in-memory splits that travel in `config["arrays"]` (object refs)."""
    import ray

    from raybig.data.datasets import DataMeta
    from raybig.data.loader import memory_sources, writable
    from raybig.spec import JobSpec
    from raybig.store_io import open_run_store
    from raybig.train.loop import WorkerEnv, fit

    spec = JobSpec.model_validate(config["spec"])
    meta = DataMeta(**config["meta"])
    torch.set_num_threads(config["threads"])
    if sources is None:
        sources = memory_sources(spec, *(writable(ray.get(config["arrays"][split])) for split in ("train", "val")),
                                 rank)
    board = config.get("board")
    progress = (lambda item: board.push.remote(item)) if board is not None and rank == 0 else None
    env = WorkerEnv(rank, world, device, *sources, progress=progress,
                    prune_checkpoints=config["prune_checkpoints"], **({"report": report} if report else {}))
    fit(spec, meta, env, open_run_store(config["store"]))
