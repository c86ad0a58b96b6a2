"""Batching that costs a lone request nothing.

Serve's @serve.batch holds the first request of every batch for the whole batch window, hoping for company:
a request that arrives alone always waits it out (docs/benchmarks.md, serving: 0.23-0.26x a bare server's
requests/s at concurrency 1). Here a request that finds the model idle runs at once. Requests that arrive
while a forward pass runs queue up and share the next one; once passes take more than one request
(requests overlap: there is load), the next pass also waits up to the window for more, so batches still
fill under load.
"""
from __future__ import annotations

import asyncio
from typing import Callable


class Batcher:
    """`await batcher(x)` answers `forward([x, ...])[i]`: one call of `forward` per batch of up to
    `max_batch_size` inputs. One instance per model version: a batch never mixes versions."""

    def __init__(self, forward: Callable[[list], list], max_batch_size: int, wait_s: float):
        self.forward, self.max_batch_size, self.wait_s = forward, max_batch_size, wait_s
        self.queue: list[tuple[object, asyncio.Future]] = []
        self.running = False  # a task is answering the queue
        self.loaded = False  # the last pass took more than one request
        self.full = asyncio.Event()  # the queue holds a whole batch: stop waiting for more
        self.batches = self.requests = self.largest_batch = 0

    async def __call__(self, x):
        future = asyncio.get_running_loop().create_future()
        self.queue.append((x, future))
        if len(self.queue) >= self.max_batch_size:
            self.full.set()
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._answer())
        return await future

    async def _answer(self) -> None:
        try:
            while self.queue:
                if self.loaded and self.wait_s > 0 and len(self.queue) < self.max_batch_size:
                    try:
                        await asyncio.wait_for(self.full.wait(), self.wait_s)
                    except asyncio.TimeoutError:
                        pass
                batch, self.queue = self.queue[:self.max_batch_size], self.queue[self.max_batch_size:]
                self.full.clear()
                self.loaded = len(batch) > 1
                self._run(batch)
                await asyncio.sleep(0)  # let the requests that arrived during the pass join the queue
        finally:
            self.running = False

    def _run(self, batch: list) -> None:
        self.batches += 1
        self.requests += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            outputs = self.forward([x for x, _ in batch])
        except Exception as err:  # every request of the batch gets the error; the batcher goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), output in zip(batch, outputs):
            if not future.done():  # its client may have gone
                future.set_result(output)

    def stats(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "largest_batch": self.largest_batch,
                "mean_batch": self.requests / self.batches if self.batches else 0.0}
