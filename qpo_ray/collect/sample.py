"""Batched prompt sampling on a Ray Data actor pool (one policy copy per actor), like batch inference."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qpo_ray.config import CollectConfig
from qpo_ray.progress import bar


def pick_collect_queries(queries: Sequence[tuple[str, str]], n: int, loop: int, seed: int) -> list[tuple[str, str]]:
    """The loop's collect queries: ``n`` drawn without replacement from the collect split, seeded by loop."""
    rng = random.Random(f"{seed}:collect:{loop}")
    pool = list(queries)
    return rng.sample(pool, min(n, len(pool)))


class _Sampler:
    """Ray Data actor: loads the policy once, then proposes prompts batch by batch."""

    def __init__(self, policy_dir: str, gen: dict[str, Any], threads: int | None = None):
        import torch

        from qpo_ray.policy.model import QPOPolicy

        if threads:
            torch.set_num_threads(threads)
        self.policy = QPOPolicy.load(policy_dir)
        self.gen = gen

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from qpo_ray.policy.generate import generate_prompts, reward_estimates

        n = self.gen["num_candidates"]
        rows = np.repeat(batch["row"], n)
        queries = [str(q) for q in np.repeat(batch["query"], n)]
        # Each query's draws come from its own seeded generator: the same query gets the same candidates
        # however the rows are batched or spread over actors.
        prompts = generate_prompts(self.policy, queries, greedy=self.gen["greedy"], top_k=self.gen["top_k"],
                                   top_p=self.gen["top_p"], temperature=self.gen["temperature"],
                                   target_reward=self.gen["target_reward"], batch_size=len(queries),
                                   seed=self.gen["seed"])
        if self.policy.pcfg.reward_head == "last_prompt":
            rhat = reward_estimates(self.policy, queries, prompts)
        else:
            rhat = [float("nan")] * len(prompts)
        return {"row": rows, "query": np.array(queries, dtype=object), "label": np.repeat(batch["label"], n),
                "prompt": np.array(prompts, dtype=object), "rhat": np.array(rhat, dtype=np.float64)}


def sample_prompts(policy_dir: str | Path, queries: Sequence[tuple[str, str]], ccfg: CollectConfig, *,
                   seed: int, greedy: bool = False, target_reward: float | None = None,
                   num_candidates: int | None = None, desc: str = "sample",
                   progress: bool = True) -> list[dict[str, Any]]:
    """``num_candidates`` (default ``collect.num_candidates``) prompts per (query, label), sampled on a pool of
    ``collect.num_actors`` actors, each with ``rhat`` = r̂(q, p) (NaN without the "last_prompt" head).
    Rows keep the input order, a query's candidates in the order they were drawn."""
    import ray

    if not queries:
        return []
    n = ccfg.num_candidates if num_candidates is None else num_candidates
    items = [{"row": i, "query": q, "label": lab} for i, (q, lab) in enumerate(queries)]
    gen = {"greedy": greedy, "top_k": ccfg.top_k, "top_p": ccfg.top_p, "temperature": ccfg.temperature,
           "target_reward": ccfg.target_reward if target_reward is None else target_reward, "seed": seed,
           "num_candidates": 1 if greedy else n}
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // ccfg.batch_size))
    ds = ds.map_batches(
        _Sampler,
        fn_constructor_kwargs={"policy_dir": str(policy_dir), "gen": gen},
        batch_size=ccfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ccfg.num_actors),
        num_gpus=ccfg.num_gpus_per_actor or None,
        num_cpus=ccfg.num_cpus_per_actor,
    )
    out = []
    with bar(len(items), desc, unit="query", enabled=progress) as meter:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            out += [dict(zip(b, vals, strict=True)) for vals in zip(*b.values(), strict=True)]
            meter.update(len(set(b["row"].tolist())))
    out.sort(key=lambda r: int(r["row"]))  # stable: a query's candidates keep their order
    return [{"query": str(r["query"]), "label": str(r["label"]), "prompt": str(r["prompt"]),
             "rhat": None if np.isnan(r["rhat"]) else float(r["rhat"])} for r in out]
