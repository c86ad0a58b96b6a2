"""Rank processes started before a run needs them, kept by the warm local Ray of `raybig up`.

A rank's process costs seconds to start on a small machine: the process itself, torch's import, and the
compiler stack DDP imports when it wraps a model (about 1.5 s here). `raybig up` keeps a few processes
that have paid all of it (`--spare-ranks`), in a detached actor's care; a run attached to that Ray takes
them instead of starting its own ranks, and they are replaced once the run is done with them, so every
run still gets processes no other run has used.

They run raybig as it was when `raybig up` started them, in `raybig up`'s environment. A run takes them
only where that cannot matter: the same raybig files (a fingerprint of them), CPU ranks, a model store on
a local path (no credentials from the run's environment needed), a built-in or Hugging Face model (no
code of the user's to import from the run's directory), data held in memory. Otherwise, or when too few
are ready, it starts its own ranks, as it does without `raybig up`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import ray

POOL, NAMESPACE = "raybig-spare-ranks", "raybig"


def code_fingerprint() -> str:
    """raybig's own files as this process sees them: their paths, sizes and modification times."""
    import raybig

    root = Path(raybig.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@ray.remote(num_cpus=0)
class SparePool:
    """Keeps `size` warmed rank processes (raybig.train.group.Rank, zero CPUs: a run that takes them has
    reserved its CPUs in its own placement group)."""

    def __init__(self, size: int, fingerprint: str):
        self.size, self.fingerprint = size, fingerprint
        self.warming: dict = {}  # the warm-up call of each rank still starting -> its rank
        self.ready: list = []
        self.refill()

    def refill(self) -> None:
        from raybig.train.group import Rank

        while len(self.ready) + len(self.warming) < self.size:
            rank = Rank.options(num_cpus=0).remote()
            self.warming[rank.warm.remote()] = rank

    def _settle(self) -> None:
        """Move the ranks that finished warming up to `ready`."""
        if self.warming:
            done, _ = ray.wait(list(self.warming), num_returns=len(self.warming), timeout=0)
            for ref in done:
                rank = self.warming.pop(ref)
                try:
                    ray.get(ref)
                    self.ready.append(rank)
                except ray.exceptions.RayError:  # it died warming: refill() starts another
                    pass

    def take(self, count: int, fingerprint: str) -> list:
        """`count` warmed ranks, or none (too few ready, or the caller runs other raybig files). Their
        replacements start when the run calls refill(), once done: not while it starts."""
        self._settle()
        if fingerprint != self.fingerprint or len(self.ready) < count:
            return []
        taken, self.ready = self.ready[:count], self.ready[count:]
        return taken

    def wait_ready(self) -> int:
        """Block until every spare has warmed up; how many are ready."""
        ray.wait(list(self.warming), num_returns=len(self.warming))
        self._settle()
        self.refill()
        return len(self.ready)


def start_pool(size: int, timeout: float) -> int:
    """On the warm Ray this process is connected to: the pool of `size` spares, warmed; how many are ready."""
    pool = SparePool.options(name=POOL, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(
        size, code_fingerprint())
    return ray.get(pool.wait_ready.remote(), timeout=timeout)


def usable(spec, loader: str, store_location: str) -> bool:
    from raybig.store_io import is_uri

    return (spec.resources.gpus_per_worker == 0 and loader == "memory" and not is_uri(store_location)
            and spec.model.kind != "python")


def take(spec, loader: str, store_location: str) -> list:
    """Warmed ranks for this run from the pool of `raybig up`, when there is one and it can serve the run."""
    if not usable(spec, loader, store_location):
        return []
    try:
        pool = ray.get_actor(POOL, namespace=NAMESPACE)
    except ValueError:  # no `raybig up` pool on this cluster
        return []
    return ray.get(pool.take.remote(spec.parallelism.workers, code_fingerprint()))


def replace_taken() -> None:
    """A run is done with the spares it took (and has ended them): the pool starts their replacements."""
    try:
        ray.get_actor(POOL, namespace=NAMESPACE).refill.remote()
    except ValueError:
        pass
