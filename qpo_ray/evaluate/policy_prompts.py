"""The QPO methods: each writes one prompt per test query with a trained policy.

- ``qpo_greedy``: the policy's most likely prompt at ``r = eval.target_reward`` (greedy decoding, or beam
  search with ``eval.num_beams`` > 1);
- ``qpo_best_of_n``: ``eval.best_of_n`` prompts sampled at that reward (``collect``'s top-k / top-p /
  temperature), the one the reward head rates highest;
- ``qpo_rerank``: the candidate prompt (the pool's, or the recorded ones of that query) the reward head rates
  highest, in the style of Prompt-OIRL's offline selection; it keeps the best single prompt on train unless
  the best candidate's r̂ beats it by more than ``eval.rerank_margin`` (``qpo_ray.evaluate.margin``).

The last two need the ``last_prompt`` reward head; with the reference's ``reward_slot`` head only
``qpo_greedy`` is reported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qpo_ray.config import CollectConfig, EvalConfig

METHOD_OF = {"greedy": "qpo_greedy", "best_of_n": "qpo_best_of_n", "rerank": "qpo_rerank"}


def qpo_prompts(policy_dir: str | Path, queries: Sequence[str], ecfg: EvalConfig, ccfg: CollectConfig, *,
                candidates: Sequence[Sequence[str]] | None = None, default: str | None = None, margin: float = 0.0,
                seed: int = 0) -> tuple[dict[str, list[str]], dict]:
    """Every method's prompts for ``queries`` (method name → one prompt per query), and the seconds each took.

    Rerank keeps ``default`` (the best single prompt on train) where it is a candidate, unless another
    candidate's r̂ beats it by more than ``margin``."""
    from qpo_ray.policy.generate import best_of_n, generate_prompts, rerank
    from qpo_ray.policy.model import QPOPolicy

    policy = QPOPolicy.load(policy_dir)
    out: dict[str, list[str]] = {}
    took: dict[str, Any] = {}
    t0 = time.perf_counter()
    out["qpo_greedy"] = generate_prompts(policy, list(queries), target_reward=ecfg.target_reward, greedy=True,
                                         num_beams=ecfg.num_beams)
    took["qpo_greedy"] = round(time.perf_counter() - t0, 2)
    if policy.pcfg.reward_head == "last_prompt":
        if ecfg.best_of_n > 1:
            t0 = time.perf_counter()
            out["qpo_best_of_n"] = best_of_n(policy, list(queries), ecfg.best_of_n, target_reward=ecfg.target_reward,
                                             top_k=ccfg.top_k, top_p=ccfg.top_p, temperature=ccfg.temperature,
                                             seed=seed)
            took["qpo_best_of_n"] = round(time.perf_counter() - t0, 2)
        if candidates is not None:
            t0 = time.perf_counter()
            out["qpo_rerank"] = rerank(policy, list(queries), candidates, default=[default] * len(queries),
                                       margin=margin)
            took["qpo_rerank"] = round(time.perf_counter() - t0, 2)
    return out, took
