"""How batches reach a rank: the same two-method interface for cached and streamed data.

`memory`: each worker holds the (small) train split and takes its slice of every *global* batch,
drawn from one seeded permutation per epoch. The batches are then the same for any data-parallel
degree, which is what makes a data-degree-2 run reproduce a single-process run step for step.

`stream`: the split is on disk in shards (raybig.data.shards); each rank reads its slice of the same
global batches a window of shards at a time, in memory bounded by `data.memory_mb`, and resumes mid-epoch
at the exact next batch (ShardSource).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def choose_loader(requested: str, nbytes: int, memory_bytes: int) -> str:
    if requested != "auto":
        return requested
    return "memory" if nbytes <= memory_bytes else "stream"


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class MemorySource:
    def __init__(self, x, y, global_batch: int, rank: int, world: int, seed: int, eval_batch: int = 512,
                 augment=None):
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.local = global_batch // world
        self.eval_batch = eval_batch
        self.augment = augment  # (batch, its rows' indices, seed) -> batch: training images' flips and crops

    @property
    def steps_per_epoch(self) -> int:
        return len(self.y) // self.global_batch  # the last partial batch is dropped, as every rank must step together

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from the `start`-th on: a run resumed mid-epoch gets exactly the rest."""
        perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        for step in range(start, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local
            idx = perm[start: start + self.local]
            x = self.x[idx]
            yield (self.augment(x, idx, epoch_seed(self.seed, epoch)) if self.augment else x), self.y[idx]

    def eval_batches(self) -> Iterator[Batch]:
        x, y = self.x[self.rank:: self.world], self.y[self.rank:: self.world]
        for start in range(0, len(y), self.eval_batch):
            yield x[start: start + self.eval_batch], y[start: start + self.eval_batch]


def rank_sources(spec, train, val, rank: int) -> tuple:
    """Train and validation sources for one rank, from splits in memory (Split) or on disk (ShardedSplit).
    All stages of a pipeline replica see that replica's batch, and evaluate in batches of the training
    microbatch shape (the shape its stages were built for)."""
    dp, stages = spec.parallelism.data, spec.parallelism.pipeline.stages
    # the ranks of one replica (its stages, and their tensor-parallel shards) see the same batches
    batch, seed, replica = spec.train.batch_size, spec.train.seed, rank // (stages * spec.parallelism.tensor)
    eval_batch = batch // dp if stages > 1 else 512
    from raybig.data.shards import ShardedSplit

    if isinstance(train, ShardedSplit):
        window = spec.data.memory_mb * 2**20 // 2  # the other half: the window being read ahead
        return (ShardSource(train, batch, replica, dp, seed, window),
                ShardSource(val, batch, replica, dp, seed, window, eval_batch=eval_batch))
    augment = None
    if spec.data.source == "image_folder":
        from raybig.data.images import Augment

        augment = Augment(spec.data.augment, len(train)) or None
    return (MemorySource(train.x, train.y, batch, replica, dp, seed, augment=augment),
            MemorySource(val.x, val.y, batch, replica, dp, seed, eval_batch=eval_batch))


class ShardSource:
    """A split on disk (raybig.data.shards), in the same global batches for any data degree, in memory
    bounded by `window_bytes`. An epoch's order: the shards permuted, then taken in windows of as many as fit
    `window_bytes`, each window's rows permuted; global batch k is rows k*B.. of that order, and this rank
    reads only its slice of each. The order is a function of the seed and the epoch alone, so a run resumed
    at batch k reads exactly the rest, starting in the window that holds it. The next window is read while
    this one trains."""

    def __init__(self, split, global_batch: int, rank: int, world: int, seed: int, window_bytes: int,
                 eval_batch: int = 512):
        self.split, self.global_batch, self.rank, self.world, self.seed = split, global_batch, rank, world, seed
        self.local = global_batch // world
        self.eval_batch = eval_batch
        self.window_shards = max(1, window_bytes // max(1, split.row_bytes * max(r for _, r in split.shards)))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.split) // self.global_batch

    def _windows(self, epoch: int) -> list[list[int]]:
        """The epoch's windows: the shards each takes, in order."""
        order = np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(len(self.split.shards)).tolist()
        return [order[i: i + self.window_shards] for i in range(0, len(order), self.window_shards)]

    def _permutation(self, epoch: int, window: int, rows: int) -> np.ndarray:
        # drawn when the window is read: the rank never holds more than a window's worth of order
        return np.random.default_rng([epoch_seed(self.seed, epoch), window]).permutation(rows)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from the `start`-th on: a run resumed mid-epoch gets exactly the rest."""
        first, end = start * self.global_batch, self.steps_per_epoch * self.global_batch
        begin = self.rank * self.local

        def wanted(lo: int, hi: int) -> np.ndarray:  # the epoch positions in [lo, hi) that are this rank's
            pos = np.arange(max(lo, first), min(hi, end))
            return pos[(pos % self.global_batch >= begin) & (pos % self.global_batch < begin + self.local)] - lo

        def windows():
            lo = 0
            for w, shards in enumerate(self._windows(epoch)):
                rows = sum(self.split.shards[s][1] for s in shards)
                if lo + rows > first and lo < end:
                    yield self._rows(shards, self._permutation(epoch, w, rows)[wanted(lo, lo + rows)])
                lo += rows

        yield from _in_batches(_read_ahead(windows()), self.local, drop_last=True)

    def eval_batches(self) -> Iterator[Batch]:
        """Rows rank, rank + world, ... in shard order, as the memory loader takes them."""
        def shards():
            lo = 0
            for i, (_, rows) in enumerate(self.split.shards):
                mine = np.arange((self.rank - lo) % self.world, rows, self.world)
                yield self._rows([i], mine)
                lo += rows

        yield from _in_batches(_read_ahead(shards()), self.eval_batch, drop_last=False)

    def _rows(self, shards: list[int], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (indices into the shards' rows laid end to end) of these shards, in the order given."""
        sizes = np.cumsum([0] + [self.split.shards[s][1] for s in shards])
        x = np.empty((len(rows), *self.split.shape), self.split.x_dtype)
        y = np.empty((len(rows), *self.split.y_shape), self.split.y_dtype)
        for k, s in enumerate(shards):
            take = (rows >= sizes[k]) & (rows < sizes[k + 1])
            if take.any():
                sx, sy = self.split.read(s)
                x[take], y[take] = sx[rows[take] - sizes[k]], sy[rows[take] - sizes[k]]
        return x, y


def _in_batches(parts: Iterator[tuple[np.ndarray, np.ndarray]], size: int, drop_last: bool) -> Iterator[Batch]:
    """Consecutive rows of `parts`, `size` at a time, as torch tensors (a language model's ids as int64)."""
    rest = None
    for x, y in parts:
        if rest is not None:
            x, y = np.concatenate([rest[0], x]), np.concatenate([rest[1], y])
        full = len(y) // size * size
        for start in range(0, full, size):
            yield _tensors(x[start: start + size], y[start: start + size])
        rest = x[full:], y[full:]
    if rest is not None and len(rest[1]) and not drop_last:
        yield _tensors(*rest)


def _tensors(x: np.ndarray, y: np.ndarray) -> Batch:
    def tensor(a):
        return torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else np.ascontiguousarray(a))
    return tensor(x), tensor(y)


def _read_ahead(parts: Iterator, depth: int = 1) -> Iterator:
    """`parts` produced on a thread, `depth` ahead of the consumer; it stops when the consumer does."""
    import queue
    import threading

    ready, stop, end = queue.Queue(maxsize=depth), threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for part in parts:
                if not put(part):
                    return
            put(end)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    threading.Thread(target=produce, name="raybig-read-ahead", daemon=True).start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def writable(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Own copies of arrays read from Ray's object store, which hands out read-only views torch will not wrap."""
    return tuple(np.array(a) for a in split)
