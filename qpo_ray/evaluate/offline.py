"""Replay evaluation of a QPO policy on recorded logs (``qpo-ray eval --target replay``).

No target LLM is called: the logs (e.g. the Prompt-OIRL MAWPS/SVAMP correctness logs, imported with
``qpo-ray data import --format oirl --split all``) are both the training data and the judge.

1. **Split** (``qpo_ray.evaluate.split``). The rows of one dataset version are split by unique query text, so
   repeats of a question never sit on both sides. With ``eval.rerank_margin: fit``, ``eval.val_fraction`` of
   the train queries are held out of training.
2. **Train** (``qpo_ray.evaluate.offline_policy``). The train rows become dataset v000 of a new run directory
   ``out_dir``, where the policy is trained with Ray Train + DeepSpeed; a rerun reuses or resumes it.
   Rerank's margin is then fitted on the held-out queries (``qpo_ray.evaluate.margin``).
3. **Prompts.** The QPO methods (``qpo_ray.evaluate.policy_prompts``) write one prompt per test query; rerank
   ranks the prompts recorded for that query, keeping the best single prompt on train unless r̂ beats it by
   more than the margin; best-of-N samples with the config's ``seed``.
4. **Judge.** A pool prompt's correctness on a test query is its mean recorded correctness there (``None``
   when it was not recorded on that query). A QPO prompt is answered by a ``ReplayTable`` of the TEST rows
   (exact match, else the most similar recorded prompt of that query; below the similarity bar it is
   unmatched and counts as incorrect). The comparison is ``qpo_ray.evaluate.compare``, the same as live.

Results go to ``out_dir/offline_eval.json`` (every query's prompts and correctness) and
``out_dir/offline_report.md`` (``qpo_ray.evaluate.report``); ``out_dir/policy/inference.json`` records the
headline method (``eval.method``) with its settings, the recorded prompts, the best single prompt on train and
the margin, so ``qpo-ray serve --policy out_dir/policy`` serves the prompts measured here
(``qpo_ray.policy.served``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qpo_ray.atomic import atomic_write_bytes, atomic_write_json
from qpo_ray.config import RunConfig
from qpo_ray.data.schema import normalize_text
from qpo_ray.errors import ConfigError
from qpo_ray.evaluate.baselines import test_queries
from qpo_ray.evaluate.compare import (
    MIN_TRAIN_COVERAGE,
    EvalQuery,
    Judge,
    best_single_on_train,
    compare,
    per_prompt_accuracy,
)
from qpo_ray.evaluate.margin import fit_on_validation
from qpo_ray.evaluate.offline_policy import POLICY_SUBDIR, offline_policy
from qpo_ray.evaluate.policy_prompts import METHOD_OF, default_prompt_source, qpo_prompts
from qpo_ray.evaluate.report import render_offline_report
from qpo_ray.evaluate.split import OfflineSplit, resolve_data, split_for_training
from qpo_ray.policy.inference import InferenceSettings
from qpo_ray.policy.served import write_inference
from qpo_ray.score.replay import MIN_SIMILARITY, ReplayTable

log = logging.getLogger("qpo_ray")

EVAL_JSON = "offline_eval.json"
REPORT_MD = "offline_report.md"


def evaluate_offline(cfg: RunConfig, data_run_dir: str | Path, out_dir: str | Path, *, test_fraction: float,
                     version: int | None = None) -> dict[str, Any]:
    """Split the logs of ``data_run_dir`` (dataset ``version``, default the latest that added rows) by unique
    query, train a policy on the train rows in ``out_dir``, let every QPO method write a prompt per test query,
    and compare with the recorded-prompt baselines by replay (module doc).

    ``cfg.eval.max_test_queries`` (if set) evaluates a seeded sample of the test queries; every method is
    measured on the same ones. Writes ``offline_eval.json`` and ``offline_report.md`` into ``out_dir`` and
    returns the JSON's content. The config's ``seed`` seeds the split and everything after it."""
    seed = cfg.seed
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {test_fraction}: must be strictly between 0 and 1")
    t_start = time.perf_counter()
    data_store, version, data_dir = resolve_data(data_run_dir, version)
    out = Path(out_dir).resolve()
    if out == data_dir:
        raise ConfigError(f"--out {out}: must differ from the --data run directory")
    fit = cfg.eval.rerank_margin == "fit" and cfg.policy.reward_head == "last_prompt"
    split = split_for_training(cfg, data_store, version, test_fraction, seed, where=data_run_dir, fit_margin=fit)
    cfg = cfg.model_copy(update={"run_dir": str(out)})
    training = offline_policy(cfg, split, data_store, version, data_dir, out, fit_margin=fit)

    queries = split.test_queries
    if cfg.eval.max_test_queries is not None and cfg.eval.max_test_queries < len(queries):
        queries = sorted(test_queries(queries, cfg.eval.max_test_queries, seed))
    pool_keys = split.recorded_prompts()
    pool = [split.prompt_text[p] for p in pool_keys]
    best = best_single_on_train(split.train_acc, pool, MIN_TRAIN_COVERAGE)
    best_prompt = best["prompt"] if best else None
    margin = _rerank_margin(cfg, split, out / POLICY_SUBDIR, best_prompt, fit)
    settings = InferenceSettings.from_config(cfg, candidates=pool, default_prompt=best_prompt,
                                             margin=margin["margin"])
    result, took = _qpo_vs_pool(cfg, split, queries, pool_keys, settings, best, out / POLICY_SUBDIR,
                                _replay_judge(split, MIN_SIMILARITY, f"{data_dir} test rows"), seed)
    result.update(_setup(cfg, split, data_dir, version, len(queries), out, training, took, margin))
    matches = {m: dict(Counter(row["methods"][m]["match"] for row in result["per_query"])) for m in took}  # QPO methods
    result.update({
        "replay": {"min_similarity": MIN_SIMILARITY, "matches": matches, "unmatched_count_as_incorrect": True},
        "min_train_coverage": MIN_TRAIN_COVERAGE,
        "per_prompt": per_prompt_accuracy(split.train_acc, split.test_acc, pool_keys, split.names),
        "wall_s": round(time.perf_counter() - t_start, 2),
    })
    atomic_write_json(out / EVAL_JSON, result)
    atomic_write_bytes(out / REPORT_MD, render_offline_report(result).encode("utf-8"))
    _record_inference(out, cfg, settings, split, best, margin)
    log.info("offline eval: wrote %s and %s", out / EVAL_JSON, out / REPORT_MD)
    return result


def _rerank_margin(cfg: RunConfig, split: OfflineSplit, policy_dir: Path, best_prompt: str | None,
                   fit: bool) -> dict[str, Any]:
    """Rerank's margin: fitted on the held-out queries (``fit``), else ``eval.rerank_margin``."""
    if fit:
        return fit_on_validation(policy_dir, split, best_prompt)
    # "fit" without the last_prompt head: there is no rerank, so no margin to fit.
    return {"margin": 0.0 if cfg.eval.rerank_margin == "fit" else float(cfg.eval.rerank_margin), "fitted": False}


def _replay_judge(split: OfflineSplit, min_similarity: float, where: str) -> Judge:
    """The judge of QPO prompts: the recorded correctness of the test rows (``ReplayTable``)."""
    replay = ReplayTable.from_rows(split.test_rows, min_similarity=min_similarity, where=where)

    def judge(pairs: Sequence[tuple[str, str]]) -> list[tuple[float | None, dict[str, Any]]]:
        out: list[tuple[float | None, dict[str, Any]]] = []
        for q, p in pairs:
            r = replay.lookup(q, p)
            out.append((r.correct if r.kind != "none" else None,
                        {"match": r.kind, "matched": r.matched_prompt, "similarity": round(r.similarity, 4)}))
        return out

    return judge


def _qpo_vs_pool(cfg: RunConfig, split: OfflineSplit, queries: Sequence[str], pool_keys: Sequence[str],
                 settings: InferenceSettings, best: dict[str, Any] | None, policy_dir: Path, judge: Judge,
                 seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Every QPO method's prompts on ``queries`` against the recorded prompts (the pool), judged by replay;
    returns the comparison and each method's prompt-writing time."""
    norm_q = [normalize_text(q) for q in queries]
    pool = [split.prompt_text[p] for p in pool_keys]
    table = [{text: split.test_acc[q].get(key) for key, text in zip(pool_keys, pool, strict=True)} for q in norm_q]
    log.info("offline eval: the policy writes prompts for %d test queries (r = %g; methods: greedy%s%s)",
             len(queries), cfg.eval.target_reward, f", best-of-{cfg.eval.best_of_n}" if cfg.eval.best_of_n > 1 else "",
             ", rerank" if cfg.policy.reward_head == "last_prompt" else "")
    recorded = [[split.prompt_text[p] for p in sorted(split.test_acc[q], key=pool_keys.index)] for q in norm_q]
    qpo, took = qpo_prompts(policy_dir, queries, settings, candidates=recorded)
    result = compare([EvalQuery(q) for q in queries], pool, table, judge, qpo, best=best,
                     default_method=METHOD_OF[cfg.eval.method], seed=seed, earlier=pool)
    return result, took


def _setup(cfg: RunConfig, split: OfflineSplit, data_dir: Path, version: int, evaluated: int, out: Path,
           training: dict[str, Any], took: dict[str, float], margin: dict[str, Any]) -> dict[str, Any]:
    """What ``offline_eval.json`` records of the data, split, policy, training and margin."""
    return {
        "target": "replay", "names": split.names, "num_beams": cfg.eval.num_beams, "best_of_n": cfg.eval.best_of_n,
        "data": {"run_dir": str(data_dir), "version": version, "rows": split.rows, "task": split.task,
                 "target": split.target, "setting": split.setting},
        "split": split.summary(evaluated),
        "policy": {"model": cfg.policy.model, "tokenizer": cfg.policy.tokenizer, "keep_layers": cfg.policy.keep_layers,
                   "max_query_tokens": cfg.policy.max_query_tokens, "max_prompt_tokens": cfg.policy.max_prompt_tokens,
                   "prompt_vocab": cfg.policy.prompt_vocab, "reward_head": cfg.policy.reward_head,
                   "target_reward": cfg.eval.target_reward, "policy_dir": str(out / POLICY_SUBDIR)},
        "training": training, "generation_s": took, "rerank": margin,
    }


def _record_inference(out: Path, cfg: RunConfig, settings: InferenceSettings, split: OfflineSplit,
                      best: dict[str, Any] | None, margin: Mapping[str, Any]) -> None:
    """``OUT/policy/inference.json``: how the policy was evaluated here, so serving it gives these prompts."""
    what = "replay evaluation"
    if margin["fitted"] and margin["val_queries"]:
        m = (f"fitted by the {what} on {margin['val_queries']} train queries held out of training "
             f"(eval.val_fraction {cfg.eval.val_fraction:g})")
    elif margin["fitted"]:
        m = f"0: the {what} had no held-out train query with the best single prompt recorded"
    else:
        m = f"eval.rerank_margin of the {what}"
    write_inference(out / POLICY_SUBDIR, cfg, settings, evaluation=what, run_config=out / "config.yaml",
                    task=split.task or None, setting=split.setting or None,
                    sources={"task": f"the task of the logs ({what})", "setting": f"the setting of the logs ({what})",
                             "candidates": f"every prompt recorded in the logs, {len(settings.candidates)} ({what}; "
                                           "there rerank ranked the ones recorded for each test query)",
                             "default_prompt": default_prompt_source(best, what), "margin": m})


__all__ = ["EVAL_JSON", "POLICY_SUBDIR", "REPORT_MD", "evaluate_offline"]
