"""The QPO methods of an evaluation: each writes one prompt per test query with a trained policy, through
the same function that serves it (``qpo_ray.policy.inference.policy_prompts``).

- ``qpo_greedy``: the policy's most likely prompt at ``r = eval.target_reward`` (greedy decoding, or beam
  search with ``eval.num_beams`` > 1);
- ``qpo_best_of_n``: ``eval.best_of_n`` prompts sampled at that reward (``collect``'s top-k / top-p /
  temperature, seeded by the config's ``seed``), the one the reward head rates highest;
- ``qpo_rerank``: the candidate prompt (the pool's, or the recorded ones of that query) the reward head rates
  highest, in the style of Prompt-OIRL's offline selection; it keeps the best single prompt on train unless
  the best candidate's r̂ beats it by more than the margin (``eval.rerank_margin``, or fitted:
  ``qpo_ray.evaluate.margin``).

The last two need the ``last_prompt`` reward head; with the reference's ``reward_slot`` head only
``qpo_greedy`` is reported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qpo_ray.policy.inference import InferenceSettings, policy_prompts

METHOD_OF = {"greedy": "qpo_greedy", "best_of_n": "qpo_best_of_n", "rerank": "qpo_rerank"}


def qpo_prompts(policy_dir: str | Path, queries: Sequence[str], settings: InferenceSettings, *,
                candidates: Sequence[Sequence[str]] | None = None) -> tuple[dict[str, list[str]], dict]:
    """Every method's prompts for ``queries`` (method name → one prompt per query), and the seconds each took.

    ``settings`` are the headline method's; each method runs with them, its own name swapped in. Rerank ranks
    ``candidates`` (one list per query) when given, else ``settings.candidates``, and runs when either is."""
    from qpo_ray.policy.model import QPOPolicy

    policy = QPOPolicy.load(policy_dir)
    methods = ["greedy"]
    if policy.pcfg.reward_head == "last_prompt":
        if settings.best_of_n > 1:
            methods.append("best_of_n")
        if candidates is not None or settings.candidates:
            methods.append("rerank")
    out: dict[str, list[str]] = {}
    took: dict[str, Any] = {}
    for m in methods:
        t0 = time.perf_counter()
        out[METHOD_OF[m]] = policy_prompts(policy, queries, replace(settings, method=m),
                                           candidates=candidates if m == "rerank" else None)
        took[METHOD_OF[m]] = round(time.perf_counter() - t0, 2)
    return out, took


def default_prompt_source(best: dict[str, Any] | None, evaluation: str) -> str:
    """Where rerank's default prompt came from, for ``inference.json``."""
    if best is None:
        return f"none: no pool prompt was recorded on enough train queries ({evaluation})"
    return (f"the best single prompt on train ({evaluation}): train accuracy {best['train_accuracy']:.3f}, "
            f"recorded on {100 * best['train_coverage']:.0f}% of the train queries")
