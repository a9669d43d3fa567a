"""Evaluation on held-out test queries: QPO against no instruction, the best single offline prompt, a
random offline prompt and the per-query oracle over the offline pool (DESIGN §1, issue 5).

Pure logic over scored rows; the caller supplies the scoring function (which never re-scores a pair).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import pyarrow.compute as pc

from qpo_ray.data.store import DatasetStore

Pairs = list[dict[str, str]]
Q = TypeVar("Q")  # a query: (text, label) in a live run, the text alone offline
ScoreFn = Callable[[Pairs, str], list[dict[str, Any]]]

METHODS = ("qpo", "no_instruction", "best_offline", "random_offline", "oracle")


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


def _summary(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    rows = list(rows)
    n = len(rows)
    if not n:
        return {"accuracy": float("nan"), "mean_reward": float("nan"), "n": 0}
    return {"accuracy": sum(r["correct"] or 0.0 for r in rows) / n,
            "mean_reward": sum(r["reward"] for r in rows) / n, "n": n}


def baseline_metrics(pool: list[dict[str, Any]], queries: Sequence[tuple[str, str]], score: ScoreFn) -> dict[str, dict]:
    """Score every pool prompt on the test queries (cached after the first call) and summarise the baselines."""
    pairs = [{"query": q, "label": lab, "prompt": p["prompt"]} for p in pool for q, lab in queries]
    rows = score(pairs, "eval-pool")
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    by_query: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt"]].append(r)
        by_query[r["query"]].append(r)
    out: dict[str, dict] = {}
    if "" in by_prompt:
        out["no_instruction"] = _summary(by_prompt[""])
    else:
        out["no_instruction"] = _summary(score([{"query": q, "label": lab, "prompt": ""} for q, lab in queries],
                                               "eval-none"))
    best = pool[0]
    out["best_offline"] = {**_summary(by_prompt[best["prompt"]]), "prompt": best["prompt"]}
    per_prompt = [_summary(by_prompt[p["prompt"]]) for p in pool]
    out["random_offline"] = {
        "accuracy": sum(s["accuracy"] for s in per_prompt) / len(per_prompt),
        "mean_reward": sum(s["mean_reward"] for s in per_prompt) / len(per_prompt),
        "n": len(queries),
    }
    oracle = [max(rs, key=lambda r: ((r["correct"] or 0.0), r["reward"])) for rs in by_query.values()]
    out["oracle"] = _summary(oracle)
    return out


def qpo_metrics(prompts: Sequence[dict[str, str]], score: ScoreFn, tag: str) -> tuple[dict[str, Any], list[dict]]:
    """Score the policy's prompts (one per test query) and summarise."""
    rows = score(list(prompts), tag)
    return _summary(rows), rows
