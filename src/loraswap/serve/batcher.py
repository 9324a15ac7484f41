"""Dynamic batching inside a replica: whenever the engine is free, the requests waiting form its next batch.

Why not ``@serve.batch``: measured on Ray 2.60 with two replicas and 8 clients, every batch it formed held
one request. It splits each batch by multiplexed model id (so the rows of different adapters never meet in
one forward, which is what loraswap's routed batches are for), and it forms the next batch after
``batch_wait_timeout_s`` whether or not the engine finished the previous one, so under load the batches
queue up one request each behind the engine. Here a batch is formed when the engine becomes free, from every
request that arrived while it was busy (at most ``max_batch``), whatever their adapters; an idle engine
starts on a request at once. Runs on the replica's event loop; the engine runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """``await batcher.submit(item)`` gives ``run(batch)[i]`` for the batch that carried ``item``.

    ``run`` (blocking, called in a worker thread, one batch at a time) returns one result per item;
    if it raises, every request of that batch gets the exception. ``after_batch`` runs on the event loop
    after each batch.
    """

    def __init__(
        self, run: Callable[[list[Item]], Sequence[Result]], max_batch: int, after_batch: Callable[[], None] = lambda: None
    ) -> None:
        self.run = run
        self.max_batch = max_batch
        self.after_batch = after_batch
        self._waiting: list[tuple[Item, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.batches = 0  # batches run so far (``/v1/stats``: requests per batch shows how well batching works)

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            self.batches += 1
            try:
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 - handed to every request of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
            else:
                for (_, future), result in zip(batch, results):
                    if not future.done():  # a client that went away cancelled its future
                        future.set_result(result)
            self.after_batch()
