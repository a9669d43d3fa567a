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


def actor_device(num_gpus: float) -> str:
    """Where an actor that reserved ``num_gpus`` puts its model: the GPU Ray gave it (Ray sets
    CUDA_VISIBLE_DEVICES, so it is "cuda"), else the CPU."""
    return "cuda" if num_gpus > 0 else "cpu"


class _Sampler:
    """Ray Data actor: loads the policy once, on the device the actor reserved, then proposes prompts batch
    by batch."""

    def __init__(self, policy_dir: str, gen: dict[str, Any], device: str = "cpu"):
        import torch

        from qpo_ray.errors import ConfigError
        from qpo_ray.policy.model import QPOPolicy

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("collect.num_gpus_per_actor > 0 but the sampling actor sees no CUDA device")
        self.policy = QPOPolicy.load(policy_dir, device=device)
        self.gen = gen

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from qpo_ray.policy.generate import generate_prompts, likely_prompts, reward_estimates

        n, g = self.gen["num_candidates"], self.gen
        # Each query's draws come from its own seeded generator: the same query gets the same candidates
        # however the rows are batched or spread over actors.
        sampled = generate_prompts(self.policy, [str(q) for q in np.repeat(batch["query"], n)], greedy=False,
                                   top_k=g["top_k"], top_p=g["top_p"], temperature=g["temperature"],
                                   target_reward=g["target_reward"], batch_size=len(batch["query"]) * n,
                                   seed=g["seed"])
        beams = (likely_prompts(self.policy, [str(q) for q in batch["query"]], g["num_beams"],
                                target_reward=g["target_reward"], exclude=g["exclude"],
                                batch_size=len(batch["query"]))
                 if g["num_beams"] else [[] for _ in batch["query"]])
        per_row = [sampled[i * n:(i + 1) * n] + beams[i] for i in range(len(batch["query"]))]
        counts = [len(p) for p in per_row]
        rows, labels = np.repeat(batch["row"], counts), np.repeat(batch["label"], counts)
        queries = [str(q) for q in np.repeat(batch["query"], counts)]
        prompts = [p for ps in per_row for p in ps]
        rhat = [float("nan")] * len(prompts)
        if self.policy.pcfg.reward_head == "last_prompt":
            unique = list(dict.fromkeys(zip(queries, prompts, strict=True)))  # r̂ once per distinct pair
            est = dict(zip(unique, reward_estimates(self.policy, [q for q, _ in unique], [p for _, p in unique]),
                           strict=True))
            rhat = [est[qp] for qp in zip(queries, prompts, strict=True)]
        return {"row": rows, "query": np.array(queries, dtype=object), "label": labels,
                "prompt": np.array(prompts, dtype=object), "rhat": np.array(rhat, dtype=np.float64)}


def sample_prompts(policy_dir: str | Path, queries: Sequence[tuple[str, str]], ccfg: CollectConfig, *,
                   seed: int, target_reward: float, exclude: Sequence[str] = (), desc: str = "sample",
                   progress: bool = True) -> list[dict[str, Any]]:
    """Candidate prompts per (query, label) at ``r = target_reward`` on a pool of ``collect.num_actors`` actors:
    the ``collect.num_candidates`` sampled ones, then the ``collect.num_beams`` most likely ones other
    than the ``exclude`` prompts (the dataset's, so the beams are new prompts), each with ``rhat`` = r̂(q, p)
    (None without the "last_prompt" head). Rows keep the input order, a query's candidates in that order."""
    import ray

    if not queries:
        return []
    items = [{"row": i, "query": q, "label": lab} for i, (q, lab) in enumerate(queries)]
    gen = {"top_k": ccfg.top_k, "top_p": ccfg.top_p, "temperature": ccfg.temperature,
           "target_reward": target_reward, "seed": seed, "num_candidates": ccfg.num_candidates,
           "num_beams": ccfg.num_beams, "exclude": list(exclude)}
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // ccfg.batch_size))
    ds = ds.map_batches(
        _Sampler,
        fn_constructor_kwargs={"policy_dir": str(policy_dir), "gen": gen,
                               "device": actor_device(ccfg.num_gpus_per_actor)},
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
