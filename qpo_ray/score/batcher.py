"""Engine-paced batching for a Serve replica: the next batch is formed when the engine is free.

Used by every replica that batches model work: the scoring pool's target replicas, the OpenAI-compatible
target server and the policy service.

``@serve.batch`` forms the next batch as soon as the previous one is dispatched, while the engine is still
busy with it, and takes whatever has arrived by then. With a steady stream of 32 requests in flight and
batches of 16 it formed batches of 16, 11, 5, 16, 11, 5 (benchmarks/bench_score.py). A compute-bound engine
does the most work per second with full batches, and the transformers engine shares a prompt's prefix only
within a batch. Here the requests queue while the engine works, and the next batch takes up to
``max_batch_size`` of them once it is done. When the engine was idle, the batch keeps collecting requests until
it is full or none has arrived for ``wait_s``. ``@serve.batch`` stops ``wait_s`` after the first request, which cut
the first batch of a burst short: the client's 32 requests took longer than 50 ms to arrive, and the pool ran
8, 16, 16, 16, 8 instead of 4 × 16. A lone request still waits ``wait_s``; a steady trickle at most
``max_batch_size × wait_s``.

A batch can also be bounded by work (``max_batch_cost``, each item submitted with its cost) and shared
fairly: items submitted under one ``group`` (the slices of one big request) take turns with the other
groups, the least-served group first. A small request that arrives behind 8 requests of 64 long queries
then rides in the next batch instead of waiting for all 512 queries (benchmarks/bench_serve.py). Without a
group every item is its own, and batches are formed first come, first served.

A failed batch is run again one request at a time, so the error reaches only the request that causes it
(a query the tokenizer cannot encode, a value that overflows): one poison request among 30 failed 1–3
valid ones per round when the whole batch got its error. A batch whose every request fails alone costs
``max_batch_size + 1`` calls instead of one, which only a broken engine pays.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Entry:
    item: Any
    fut: asyncio.Future
    cost: int
    group: Hashable
    seq: int = field(default=0)


class EngineBatcher:
    """Groups concurrent ``submit`` calls of one replica into calls of ``fn(items) -> results``, in a thread."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int, wait_s: float,
                 max_batch_cost: int | None = None):
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self.max_batch_cost = max_batch_cost  # None: only max_batch_size bounds a batch
        self._pending: list[_Entry] = []
        self._served: dict[Hashable, int] = {}  # cost already batched, per group with items still pending
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any, *, cost: int = 1, group: Hashable | None = None) -> Any:
        """The result of ``item`` (or its exception), once its batch has run. Items of one ``group`` take
        turns with other groups' (module doc); ``cost`` counts against ``max_batch_cost``."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # started here: the replica's event loop runs only once requests come
            self._start(loop)
        fut = loop.create_future()
        seq = next(self._seq)
        self._pending.append(_Entry(item, fut, cost, seq if group is None else group, seq))
        self._arrived.set()
        return await fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (an in-process test client may start one per request): what the old one held is
        # gone with it.
        self._loop, self._pending, self._served = loop, [], {}
        self._arrived = asyncio.Event()
        self._worker = loop.create_task(self._run())

    def _full(self) -> bool:
        if len(self._pending) >= self.max_batch_size:
            return True
        return self.max_batch_cost is not None and sum(e.cost for e in self._pending) >= self.max_batch_cost

    def _take(self) -> list[_Entry]:
        """Up to ``max_batch_size`` items costing at most ``max_batch_cost`` (at least one item): each time the
        next item of the group served least so far, then of the one with the least work left, then the oldest:
        groups take turns, and a small request goes before big ones that have not started yet either."""
        batch: list[_Entry] = []
        cost = 0
        while self._pending and len(batch) < self.max_batch_size:
            heads: dict[Hashable, _Entry] = {}
            left: dict[Hashable, int] = {}
            for e in self._pending:
                heads.setdefault(e.group, e)
                left[e.group] = left.get(e.group, 0) + e.cost
            e = min(heads.values(), key=lambda e: (self._served.get(e.group, 0), left[e.group], e.seq))
            if batch and self.max_batch_cost is not None and cost + e.cost > self.max_batch_cost:
                break
            self._pending.remove(e)
            batch.append(e)
            cost += e.cost
            self._served[e.group] = self._served.get(e.group, 0) + e.cost
        live = {e.group for e in self._pending}
        self._served = {g: n for g, n in self._served.items() if g in live}
        return batch

    async def _next_batch(self) -> list[_Entry]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        while not self._full():
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self.wait_s)
            except TimeoutError:  # no request for wait_s: run what there is
                break
        return self._take()

    async def _run(self) -> None:
        while True:
            batch = [(e.item, e.fut) for e in await self._next_batch() if not e.fut.done()]  # done = cancelled
            if not batch:
                continue
            outcomes = await asyncio.to_thread(self._isolated, [item for item, _ in batch])
            for (_, fut), out in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if isinstance(out, _Failed):
                    fut.set_exception(out.error)
                else:
                    fut.set_result(out)

    def _call(self, items: list[Any]) -> list[Any]:
        results = list(self.fn(items))
        if len(results) != len(items):
            raise _WrongCount(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    def _isolated(self, items: list[Any]) -> list[Any]:
        """``fn(items)``, or when that raises, each item alone: its result or its ``_Failed`` error."""
        try:
            return self._call(items)
        except _WrongCount as e:  # a bug in fn, not a bad item: running the items alone would hide it
            return [_Failed(e)] * len(items)
        except Exception as e:
            if len(items) == 1:
                return [_Failed(e)]
        out: list[Any] = []
        for item in items:
            try:
                out += self._call([item])
            except Exception as e:  # this item's own error; the others keep their results
                out.append(_Failed(e))
        return out


class _WrongCount(RuntimeError):
    """The batch function returned another number of results than it was given items."""


class _Failed:
    """An item's exception, told apart from a result that happens to be an exception object."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error
