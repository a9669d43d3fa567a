"""Live evaluation: the run's target LLM judges every pair (through the run's scoring pool and its cache,
so a pair is scored at most once per run). The comparison itself is ``qpo_ray.evaluate.compare``.

An evaluated loop's policy folder gets ``inference.json`` (``qpo_ray.policy.served``): its headline method
(``eval.method``) with the settings, pool, best single prompt on train and margin used here, so serving it
gives the prompts measured here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.compute as pc

from qpo_ray.config import RunConfig
from qpo_ray.data.store import DatasetStore
from qpo_ray.evaluate.baselines import offline_pool, test_queries
from qpo_ray.evaluate.compare import (
    AccTable,
    EvalQuery,
    accuracy_table,
    best_single_on_train,
    compare,
    pool_table,
    prompt_names,
)
from qpo_ray.evaluate.policy_prompts import METHOD_OF, default_prompt_source, qpo_prompts
from qpo_ray.policy.inference import InferenceSettings
from qpo_ray.policy.served import write_inference
from qpo_ray.runs import RunDir
from qpo_ray.tasks import Task

log = logging.getLogger("qpo_ray")

# The run's scoring: rows for {query, prompt, label} pairs, each pair scored at most once per run
# (``RunScores.score``).
ScoreFn = Callable[..., list[dict[str, Any]]]


def offline_rows_accuracy(store: DatasetStore, version: int = 0) -> tuple[AccTable, dict[str, str]]:
    """Train accuracy and display names of the offline rows (``loop == 0``) of ``version``, streamed."""
    rows: list[dict[str, Any]] = []
    for b in store.iter_batches(version, columns=["query", "prompt", "correct", "source", "loop"]):
        rows += b.filter(pc.equal(b.column("loop"), 0)).to_pylist()
    return accuracy_table(rows), prompt_names(rows)


def trained_prompts(store: DatasetStore, version: int) -> list[str]:
    """The distinct prompts of ``version`` (what a policy trained on it has seen)."""
    seen: dict[str, None] = {}
    for b in store.iter_batches(version, columns=["prompt"]):
        seen.update(dict.fromkeys(b.column("prompt").to_pylist()))
    return list(seen)


def record_inference(cfg: RunConfig, run: RunDir, loop: int, settings: InferenceSettings,
                     best: dict[str, Any] | None) -> None:
    """``policy/loop-N/inference.json``: how the loop's policy was evaluated, so it is served that way."""
    what = f"live evaluation of loop {loop}"
    pool = f"the offline prompt pool of D0, {len(settings.candidates)} prompts ({what})"
    write_inference(run.policy_dir(loop), cfg, settings, evaluation=what, run_config=run.path / "config.yaml",
                    sources={"candidates": pool, "default_prompt": default_prompt_source(best, what)})


def evaluate_loop(cfg: RunConfig, task: Task, run: RunDir, store: DatasetStore, score: ScoreFn,
                  loop: int) -> dict[str, Any]:
    """Baselines (and, from loop 1, the QPO methods of ``policy/loop-N``) on the task's test queries, judged
    by ``score``."""
    queries = [EvalQuery(q, lab, task.kind_of(q))
               for q, lab in test_queries(task.queries("test"), cfg.eval.max_test_queries, cfg.seed)]
    pool = [p["prompt"] for p in offline_pool(store, 0)]
    train_acc, names = offline_rows_accuracy(store, 0)

    def judge(pairs: Sequence[tuple[str, str]]) -> list[tuple[float | None, dict[str, Any]]]:
        rows = score([{"query": q, "prompt": p, "label": task.label_of(q)} for q, p in pairs],
                             f"eval-{loop}", phase="test", source="eval", loop=loop)
        return [(r["correct"], {}) for r in rows]

    table = pool_table(queries, pool, judge)
    qpo: dict[str, list[str]] = {}
    took: dict[str, Any] = {}
    best = best_single_on_train(train_acc, pool)
    if loop >= 1:
        log.info("[eval %d] writing the policy's prompts for %d test queries", loop, len(queries))
        # open_run refuses rerank_margin="fit" for live runs: it is a number here.
        settings = InferenceSettings.from_config(cfg, candidates=pool, default_prompt=best["prompt"] if best else None)
        qpo, took = qpo_prompts(run.policy_dir(loop), [q.query for q in queries], settings)
    trained_on = trained_prompts(store, loop - 1) if loop >= 1 else None
    result = compare(queries, pool, table, judge, qpo, best=best, default_method=METHOD_OF[cfg.eval.method],
                     seed=cfg.seed, earlier=trained_on)
    if loop >= 1:
        record_inference(cfg, run, loop, settings, best)
    return {"loop": loop, "target": "live", **result, "names": names, "generation_s": took,
            "num_beams": cfg.eval.num_beams, "best_of_n": cfg.eval.best_of_n}
