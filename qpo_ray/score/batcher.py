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

A failed batch is run again one request at a time, so the error reaches only the request that causes it
(a query the tokenizer cannot encode, a value that overflows): one poison request among 30 failed 1–3
valid ones per round when the whole batch got its error. A batch whose every request fails alone costs
``max_batch_size + 1`` calls instead of one, which only a broken engine pays.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


class EngineBatcher:
    """Groups concurrent ``submit`` calls of one replica into calls of ``fn(items) -> results``, in a thread."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int, wait_s: float):
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._pending: deque[tuple[Any, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()  # binds to the replica's event loop on first use (Python >= 3.10)
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """The result of ``item`` (or its exception), once its batch has run."""
        loop = asyncio.get_running_loop()
        if self._worker is None:  # started here: the replica's event loop runs only once requests come
            self._worker = loop.create_task(self._run())
        fut = loop.create_future()
        self._pending.append((item, fut))
        self._arrived.set()
        return await fut

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        while len(self._pending) < self.max_batch_size:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self.wait_s)
            except TimeoutError:  # no request for wait_s: run what there is
                break
        n = min(self.max_batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(n)]

    async def _run(self) -> None:
        while True:
            batch = [(item, fut) for item, fut in await self._next_batch() if not fut.done()]  # done = cancelled
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
