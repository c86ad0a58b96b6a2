"""What each rank runs, whichever actor hosts it (raybig.train.group): find its data and its progress
channel, then the one loop."""
from __future__ import annotations

import torch


def run_rank(config: dict, rank: int, world: int, device: torch.device, shards: dict | None = None,
             stop=None) -> None:
    """One rank of a run whose process group is already up. It takes its slice of the in-memory splits that
    travel in `config["arrays"]` (object refs), or streams its own Ray Data `shards` ({"train", "val"}).
    `stop` (a threading.Event) ends a rank that runs on its sweep trial's own thread."""
    import ray

    from raybig.data.datasets import DataMeta
    from raybig.data.loader import StreamSource, memory_sources, writable
    from raybig.spec import JobSpec
    from raybig.store_io import open_run_store
    from raybig.train.loop import WorkerEnv, fit

    spec = JobSpec.model_validate(config["spec"])
    meta = DataMeta(**config["meta"])
    if config.get("tokenizer_json"):
        meta.extra["tokenizer_json"] = config["tokenizer_json"]
    torch.set_num_threads(config["threads"])
    if shards is not None:
        batch, seed = spec.train.batch_size, spec.train.seed
        sources = tuple(StreamSource(shards[split], config[f"{split}_rows"], batch, world, seed, meta.shape)
                        for split in ("train", "val"))
    else:
        sources = memory_sources(spec, *(writable(ray.get(config["arrays"][split])) for split in ("train", "val")),
                                 rank)
    board = config.get("board")
    progress = (lambda item: board.push.remote(item)) if board is not None and rank == 0 else None
    gates = frozenset(config.get("gate_epochs", ()))
    word = (lambda epoch: ray.get(board.word_for.remote(epoch))) if gates and progress else None
    env = WorkerEnv(rank, world, device, *sources, progress=progress, attempt=config.get("attempt", ""),
                    prune_checkpoints=config["prune_checkpoints"], gate_epochs=gates, word=word, stop=stop)
    fit(spec, meta, env, open_run_store(config["store"]))
