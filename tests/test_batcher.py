"""EngineBatcher: batches formed when the engine is free, results to the right caller, an error only to the
request that causes it."""

from __future__ import annotations

import asyncio
import time

import pytest

from qpo_ray.score.batcher import EngineBatcher


def _engine(sizes: list[int], seconds: float = 0.0, fail_on: object = None):
    def fn(items):
        sizes.append(len(items))
        time.sleep(seconds)
        if fail_on in items:
            raise ValueError(f"bad item {fail_on}")
        return [2 * x for x in items]

    return fn


def test_requests_that_arrive_while_the_engine_works_fill_the_next_batch():
    sizes: list[int] = []
    b = EngineBatcher(_engine(sizes, seconds=0.4), max_batch_size=16, wait_s=0.01)

    async def main():
        first = [asyncio.create_task(b.submit(i)) for i in range(16)]
        await asyncio.sleep(0.1)  # the engine is busy with the first 16
        second = [asyncio.create_task(b.submit(i)) for i in range(16, 27)]
        await asyncio.sleep(0.1)
        third = [asyncio.create_task(b.submit(i)) for i in range(27, 32)]
        return await asyncio.gather(*first, *second, *third)

    assert asyncio.run(main()) == [2 * i for i in range(32)]
    # @serve.batch would have formed 16, 11, 5: its next batch is taken while the engine still runs.
    assert sizes == [16, 16]


def test_an_idle_engine_waits_for_its_batch_to_fill_then_runs_a_partial_one():
    sizes: list[int] = []
    b = EngineBatcher(_engine(sizes), max_batch_size=4, wait_s=0.2)

    async def main():
        tasks = [asyncio.create_task(b.submit(0))]
        await asyncio.sleep(0.05)  # within wait_s: joins the first batch
        tasks += [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        out = await asyncio.gather(*tasks)
        out.append(await b.submit(3))  # alone: runs after wait_s without a full batch
        return out

    assert asyncio.run(main()) == [0, 2, 4, 6]
    assert sizes == [3, 1]


def test_a_burst_that_arrives_slower_than_the_wait_still_fills_one_batch():
    sizes: list[int] = []
    b = EngineBatcher(_engine(sizes), max_batch_size=8, wait_s=0.1)

    async def main():
        tasks = []
        for i in range(5):  # 0.24 s from first to last: longer than wait_s, but no gap reaches it
            tasks.append(asyncio.create_task(b.submit(i)))
            await asyncio.sleep(0.06)
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    assert sizes == [5]


def test_a_poison_item_fails_alone_and_its_batch_mates_get_their_results():
    sizes: list[int] = []
    b = EngineBatcher(_engine(sizes, fail_on=1), max_batch_size=8, wait_s=0.05)

    async def main():
        first = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        after = await asyncio.gather(*(b.submit(i) for i in (5, 6)))
        return first, after

    first, after = asyncio.run(main())
    assert [x for i, x in enumerate(first) if i != 1] == [0, 4, 6]
    assert isinstance(first[1], ValueError) and "bad item 1" in str(first[1])
    # The batch of 4 failed, then ran item by item; the next batch is whole again.
    assert after == [10, 12] and sizes == [4, 1, 1, 1, 1, 2]


def test_many_poison_items_among_many_valid_ones_under_concurrency():
    bad = {3, 17, 18, 40}

    def fn(items):
        time.sleep(0.01)
        if bad & set(items):
            raise ValueError(f"bad items {sorted(bad & set(items))}")
        return [-x for x in items]

    b = EngineBatcher(fn, max_batch_size=8, wait_s=0.005)

    async def main():
        async def client(i):
            await asyncio.sleep(0.001 * (i % 7))  # arrivals spread over several batches
            return await b.submit(i)

        return await asyncio.gather(*(client(i) for i in range(48)), return_exceptions=True)

    out = asyncio.run(main())
    assert all(isinstance(out[i], ValueError) for i in bad)
    assert all(out[i] == -i for i in range(48) if i not in bad)


def test_an_engine_that_fails_everything_gives_every_caller_its_error():
    def fn(items):
        raise OSError("engine gone")

    b = EngineBatcher(fn, max_batch_size=4, wait_s=0.05)

    async def main():
        return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    assert all(isinstance(e, OSError) and "engine gone" in str(e) for e in asyncio.run(main()))


def test_a_cancelled_request_is_not_sent_to_the_engine():
    seen: list[list[int]] = []

    def fn(items):
        seen.append(list(items))
        time.sleep(0.2)
        return items

    b = EngineBatcher(fn, max_batch_size=8, wait_s=0.0)

    async def main():
        running = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)  # the engine runs [0]; the next two wait in the queue
        gone = asyncio.create_task(b.submit(1))
        kept = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await running, await kept

    assert asyncio.run(main()) == (0, 2)
    assert seen == [[0], [2]]


def test_a_wrong_number_of_results_is_an_error_not_a_misrouted_answer():
    b = EngineBatcher(lambda items: items[:-1], max_batch_size=4, wait_s=0.05)

    async def main():
        return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    with pytest.raises(RuntimeError, match="2 results for 3 items"):
        raise next(e for e in asyncio.run(main()) if isinstance(e, Exception))
