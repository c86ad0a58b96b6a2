"""Run the one training loop in N local processes over gloo, without Ray: the fast way to check that a
parallel layout computes the same thing as one process. Hangs fail fast (short collective timeout)."""
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, raw, store_dir):
    from raybig.data.datasets import load
    from raybig.data.loader import rank_sources
    from raybig.spec import parse_spec
    from raybig.store_io import open_run_store
    from raybig.train.loop import WorkerEnv, fit
    from raybig.train.runner import pick_loader

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    spec = parse_spec(raw)
    _, bundle = pick_loader(spec, load(spec.data))  # data that streams: its shards in the cache
    train, val = rank_sources(spec, bundle.train, bundle.val, rank)
    fit(spec, bundle.meta, WorkerEnv(rank, world, torch.device("cpu"), train, val), open_run_store(store_dir))
    if world > 1:
        dist.destroy_process_group()


def run_local(raw: dict, store_dir) -> None:
    """Train `raw` (a spec dict) with data x stages x tensor processes; rank 0 writes the run to store_dir
    (a path, or an s3:// / gs:// run location: then every process works in a local copy of its own)."""
    p = raw.get("parallelism", {})
    world = p.get("data", 1) * p.get("pipeline", {}).get("stages", 1) * p.get("tensor", 1)
    if world == 1:
        _worker(0, 1, 0, raw, str(store_dir))
        return
    mp.start_processes(_worker, args=(world, free_port(), raw, str(store_dir)), nprocs=world, join=True,
                       start_method="spawn")
