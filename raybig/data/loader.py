"""How batches reach a rank: the same two-method interface for cached and streamed data.

`memory`: each worker holds the (small) train split and takes its slice of every *global* batch,
drawn from one seeded permutation per epoch. The batches are then the same for any data-parallel
degree, which is what makes a data-degree-2 run reproduce a single-process run step for step.

`stream`: Ray Data hands every rank its own shard (equal row counts, so every rank takes the same
number of steps and DDP never waits on a missing peer) and streams it with a local shuffle buffer.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]
MEMORY_LIMIT_BYTES = 256 * 2**20


def choose_loader(requested: str, nbytes: int) -> str:
    if requested != "auto":
        return requested
    return "memory" if nbytes <= MEMORY_LIMIT_BYTES else "stream"


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


def memory_sources(spec, train_xy, val_xy, rank: int) -> tuple["MemorySource", "MemorySource"]:
    """Train and validation sources for one rank. All stages of a pipeline replica see that replica's batch,
    and evaluate in batches of the training microbatch shape (the shape its stages were built for)."""
    dp, stages = spec.parallelism.data, spec.parallelism.pipeline.stages
    batch, seed, replica = spec.train.batch_size, spec.train.seed, rank // stages
    eval_batch = batch // dp if stages > 1 else 512
    augment = None
    if spec.data.source == "image_folder":
        from raybig.data.images import Augment

        augment = Augment(spec.data.augment, len(train_xy[1])) or None
    return (MemorySource(*train_xy, batch, replica, dp, seed, augment=augment),
            MemorySource(*val_xy, batch, replica, dp, seed, eval_batch=eval_batch))


class StreamSource:
    def __init__(self, shard, rows: int, global_batch: int, world: int, seed: int, shape: list[int], eval_batch: int = 512):
        self.shard, self.shape, self.seed = shard, shape, seed
        self.local = global_batch // world
        self.rows_per_rank = rows // world
        self.eval_batch = eval_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_rank // self.local

    def _batches(self, size: int, shuffle_seed: int | None, drop_last: bool) -> Iterator[Batch]:
        shuffle = {"local_shuffle_buffer_size": max(4 * size, 1024), "local_shuffle_seed": shuffle_seed} \
            if shuffle_seed is not None else {}
        for batch in self.shard.iter_torch_batches(batch_size=size, drop_last=drop_last, **shuffle):
            yield batch["x"].reshape(-1, *self.shape), batch["y"]

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """From the `start`-th batch on. Ray Data does not promise the same order twice, so a run resumed
        mid-epoch skips as many batches, not necessarily the same ones."""
        for step, batch in enumerate(self._batches(self.local, epoch_seed(self.seed, epoch), drop_last=True)):
            if step == self.steps_per_epoch:
                break
            if step >= start:
                yield batch

    def eval_batches(self) -> Iterator[Batch]:
        yield from self._batches(self.eval_batch, None, drop_last=False)


def writable(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Own copies of arrays read from Ray's object store, which hands out read-only views torch will not wrap."""
    return tuple(np.array(a) for a in split)


def to_ray_datasets(bundle) -> dict:
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    def column(array: np.ndarray):
        return ArrowTensorArray.from_numpy(np.ascontiguousarray(array)) if array.ndim > 1 else array

    def table(split):
        return pa.table({"x": column(split.x), "y": column(split.y)})

    return {"train": ray.data.from_arrow(table(bundle.train)), "val": ray.data.from_arrow(table(bundle.val))}
