"""What each rank runs, whichever actor hosts it (raybig.train.group): find its data and its progress
channel, then the one loop."""
from __future__ import annotations

import torch


def run_rank(config: dict, rank: int, world: int, device: torch.device, stop=None) -> None:
    """One rank of a run whose process group is already up. It takes its slice of the splits in
    `config["splits"]`: in memory (object refs) or on disk (shard directories). `stop` (a threading.Event)
    ends a rank that runs on its sweep trial's own thread."""
    import ray

    from raybig.data.datasets import DataMeta, Split
    from raybig.data.loader import rank_sources, writable
    from raybig.data.shards import open_split
    from raybig.spec import JobSpec
    from raybig.store_io import open_run_store
    from raybig.train.loop import WorkerEnv, fit

    spec = JobSpec.model_validate(config["spec"])
    meta = DataMeta(**config["meta"])
    if config.get("tokenizer_json"):
        meta.extra["tokenizer_json"] = config["tokenizer_json"]
    torch.set_num_threads(config["threads"])
    splits = config["splits"]
    read = open_split if config["loader"] == "stream" else (lambda ref: Split(*writable(ray.get(ref))))
    sources = rank_sources(spec, read(splits["train"]), read(splits["val"]), rank)
    board = config.get("board")
    progress = (lambda item: board.push.remote(item)) if board is not None and rank == 0 else None
    gates = frozenset(config.get("gate_epochs", ()))
    word = (lambda epoch: ray.get(board.word_for.remote(epoch))) if gates and progress else None
    env = WorkerEnv(rank, world, device, *sources, progress=progress, attempt=config.get("attempt", ""),
                    prune_checkpoints=config["prune_checkpoints"], gate_epochs=gates, word=word, stop=stop)
    done = watch_driver(config.get("driver"))
    try:
        fit(spec, meta, env, open_run_store(config["store"]))
    finally:
        done.set()


DRIVER_CHECK_S = 0.2  # a cheap system call: five a second cost nothing measurable


def watch_driver(driver: dict | None):
    """End this rank's process as soon as the process that started the run is gone (a `raybig run` killed
    with SIGKILL): nobody reads what it trains, and Ray ends a dead driver's actors only once it sees the job
    gone, which took tens of seconds while the ranks trained on. Only a rank on the driver's own node can see
    it; on a cluster the others are Ray's to end. Returns the event that ends the watch (the run is over)."""
    import os
    import socket
    import threading

    done = threading.Event()
    if not driver or driver["host"] != socket.gethostname() or driver["pid"] == os.getpid():
        return done

    def watch():
        while not done.wait(DRIVER_CHECK_S):
            if not _alive(driver["pid"]):
                os._exit(1)  # no finally blocks, no collectives left waiting on a peer: the process ends here

    threading.Thread(target=watch, name="raybig-driver-watch", daemon=True).start()
    return done


def _alive(pid: int) -> bool:
    """Whether process `pid` runs. A killed process whose parent has not yet reaped it (a zombie) is gone too:
    the signal test alone would call it alive for as long as its parent lets it be."""
    import os

    from raybig.procs import stat_of

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive (another user's process)
        return True
    stat = stat_of(pid)
    return stat is None or stat[0] != "Z"  # None: no /proc (macOS), where the signal's answer stands
