"""What a live evaluation compares on: the held-out test queries and the offline prompt pool of D0."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypeVar

import pyarrow.compute as pc

from qpo_ray.data.store import DatasetStore

Q = TypeVar("Q")  # a query: (text, label) in a live run, the text alone offline


def test_queries(queries: Sequence[Q], limit: int | None, seed: int) -> list[Q]:
    """The evaluation queries: all of the test split, or a seeded sample of ``limit`` of them."""
    qs = list(queries)
    if limit is not None and limit < len(qs):
        qs = random.Random(f"{seed}:test").sample(qs, limit)
    return qs


def offline_pool(store: DatasetStore, version: int = 0) -> list[dict[str, Any]]:
    """The offline prompts of D0 with their mean raw reward over the rows they were logged on, best first.

    Streams the version; holds one aggregate per distinct prompt.
    """
    agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    texts: dict[str, str] = {}
    for b in store.iter_batches(version, columns=["prompt_id", "prompt", "reward", "loop"]):
        b = b.filter(pc.equal(b.column("loop"), 0))
        for pid, p, r in zip(b.column("prompt_id").to_pylist(), b.column("prompt").to_pylist(),
                             b.column("reward").to_pylist(), strict=True):
            a = agg[pid]
            a[0] += r
            a[1] += 1
            texts[pid] = p
    pool = [{"prompt_id": pid, "prompt": texts[pid], "mean_reward": s / n, "rows": int(n)}
            for pid, (s, n) in agg.items()]
    return sorted(pool, key=lambda x: (-x["mean_reward"], x["prompt_id"]))
