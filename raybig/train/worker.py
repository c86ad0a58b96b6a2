"""What each Ray Train worker runs: find its rank, its data and its progress channel, then the one loop."""
from __future__ import annotations

import torch


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from raybig.data.datasets import DataMeta
    from raybig.data.loader import StreamSource, memory_sources, writable
    from raybig.spec import JobSpec
    from raybig.store_io import open_run_store
    from raybig.train.loop import WorkerEnv, fit

    spec = JobSpec.model_validate(config["spec"])
    meta = DataMeta(**config["meta"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    batch, seed = spec.train.batch_size, spec.train.seed
    if config["loader"] == "memory":
        train, val = memory_sources(spec, *(writable(ray.get(config["arrays"][split])) for split in ("train", "val")),
                                    rank)
    else:
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        train = StreamSource(train_shard, config["train_rows"], batch, world, seed, meta.shape)
        val = StreamSource(val_shard, config["val_rows"], batch, world, seed, meta.shape)
    board = config.get("board")
    progress = (lambda item: board.push.remote(item)) if board is not None and rank == 0 else None
    env = WorkerEnv(rank, world, ray.train.torch.get_device(), train, val, report=ray.train.report, progress=progress,
                    prune_checkpoints=config["prune_checkpoints"])
    fit(spec, meta, env, open_run_store(config["store"]))
