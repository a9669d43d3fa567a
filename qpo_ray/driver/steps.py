"""The steps of a QPO run. Each reads its inputs from the run directory and persists its output there;
``driver.run`` decides which to (re)run, and gives each step the parts of the run it uses. The steps that
call the target (bootstrap, score, evaluate) get the run's ``RunScores``; the driver starts the scoring pool
before them."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from qpo_ray.atomic import atomic_write_json, atomic_write_table
from qpo_ray.collect import pick_collect_queries, sample_prompts
from qpo_ray.collect.screen import Candidate, ScreenStats, screen
from qpo_ray.config import RunConfig
from qpo_ray.data.prompts import prompt_identity
from qpo_ray.data.store import DatasetStore
from qpo_ray.driver.session import RunScores, read_rows
from qpo_ray.faults import fault_point
from qpo_ray.grow import merge_rows
from qpo_ray.runs import RunDir
from qpo_ray.tasks import Task
from qpo_ray.tracking import Tracker

log = logging.getLogger("qpo_ray")


def bootstrap(cfg: RunConfig, task: Task, store: DatasetStore, scores: RunScores) -> dict[str, Any]:
    """D0 when the user has prompts but no logs: score every (train query, pool prompt) pair once."""
    if store.latest() is not None:
        m = store.verify(0)
        log.info("[bootstrap] dataset v000 exists (%d rows): nothing to do", m.rows)
        return {"rows": m.rows}
    prompts = task.prompts[: cfg.task.max_prompts]
    queries = task.queries("train")[: cfg.task.max_train_queries]
    log.info("[bootstrap] scoring %d prompts × %d train queries", len(prompts), len(queries))
    by_text = {text: pid for pid, text in prompts}
    pairs = [{"query": q, "label": lab, "prompt": text} for _pid, text in prompts for q, lab in queries]
    rows = scores.score(pairs, "bootstrap", phase="collect", source="offline", loop=0)
    for r in rows:
        r["source"] = f"offline:{by_text[r['prompt']]}"
    fault_point("bootstrap.commit")
    m = store.commit([pa.Table.from_pylist(rows)], version=0, source="bootstrap rows", note="D0: bootstrap")
    log.info("[bootstrap] committed v000: %d rows, reward range [%.3f, %.3f]", m.rows, m.reward_min, m.reward_max)
    return {"rows": m.rows, "reward_min": m.reward_min, "reward_max": m.reward_max}


def train(cfg: RunConfig, run: RunDir, store: DatasetStore, tracker: Tracker, loop: int) -> dict[str, Any]:
    """Loop 1 trains from the pretrained LM ("scratch"); later loops fine-tune the previous policy. The version
    is verified first (``train_policy``: files, content, size), also in a resumed run."""
    from qpo_ray.train import train_policy

    schedule = "scratch" if loop == 1 else "finetune"
    res = train_policy(cfg, store=store, version=loop - 1, out_dir=run.policy_dir(loop), schedule=schedule,
                       init_policy=run.policy_dir(loop - 1) if loop > 1 else None,
                       run_name=f"qpo-{run.run_id}-loop-{loop}")
    # The global step counts epochs over all loops; a resumed call logs only the epochs it trained.
    base = sum((run.done(f"loop-{t}.train") or {}).get("epochs", 0) for t in range(1, loop))
    done_before = len(res.history) - res.epochs_run
    for i, m in enumerate(res.epoch_metrics):
        tracker.log("train", m, loop=loop, global_step=base + done_before + i + 1)
    return {"epochs": len(res.history), "resumed_from_epoch": res.resumed_from_epoch, "policy": str(res.policy_dir),
            "final": res.metrics}


def collect(cfg: RunConfig, task: Task, run: RunDir, scores: RunScores, loop: int) -> dict[str, Any]:
    """The policy proposes ``collect.num_candidates`` prompts per collect query at ``r = eval.target_reward``;
    r̂ screens them down to the ``collect.scored_per_query`` the target will score, new prompts first
    (collect/screen.py). Writes every candidate and the chosen pairs."""
    ccfg = cfg.collect
    queries = pick_collect_queries(task.queries("collect"), ccfg.num_queries, loop, cfg.seed)
    log.info("[loop %d] sampling %d prompts and beam-searching %d new ones for each of %d collect queries", loop,
             ccfg.num_candidates, ccfg.num_beams, len(queries))
    seen_pairs, known = scores.seen(loop - 1)
    cands = sample_prompts(run.policy_dir(loop), queries, ccfg, seed=cfg.seed * 1000 + loop,
                           target_reward=cfg.eval.target_reward, exclude=sorted(known.values()),
                           desc=f"sample loop-{loop}")
    atomic_write_table(run.loop_dir(loop) / "candidates.parquet", pa.Table.from_pylist(cands))
    known_prompts = set(known)
    chosen, stats = screen([Candidate(**c) for c in cands], seen_pairs=seen_pairs, known_prompts=known_prompts,
                           per_query=ccfg.scored_per_query, new_share=ccfg.new_share)
    rows = [{"query": c.query, "label": c.label, "prompt": c.prompt, "rhat": c.rhat,
             "new": prompt_identity(c.prompt) not in known_prompts} for c in chosen]
    atomic_write_table(run.loop_dir(loop) / "collect.parquet",
                       pa.Table.from_pylist(rows, schema=COLLECT_SCHEMA))
    log.info("[loop %d] %s", loop, screen_line(stats))
    return {"prompts": len(rows), "distinct": len({prompt_identity(r["prompt"]) for r in rows}),
            "screen": stats.as_dict()}


COLLECT_SCHEMA = pa.schema([("query", pa.string()), ("label", pa.string()), ("prompt", pa.string()),
                            ("rhat", pa.float64()), ("new", pa.bool_())])


def screen_line(stats: ScreenStats) -> str:
    return (f"{stats.sampled} candidates for {stats.queries} queries: {stats.repeats} repeats, "
            f"{stats.known_pairs} pairs scored before, {stats.degenerate} degenerate; the target scores "
            f"{stats.chosen} ({stats.chosen_new} new prompts), r̂ screened out {stats.screened_out}")


def score(cfg: RunConfig, run: RunDir, store: DatasetStore, scores: RunScores, loop: int) -> dict[str, Any]:
    """Score the loop's chosen pairs and, with ``collect.compare_pool``, the offline pool on the same collect
    queries in the same request (the pool's rows stay in the run's score cache and never join the dataset);
    writes the chosen rows (the merge's input) and how the new prompts did against the pool
    (evaluate/generated.py)."""
    from qpo_ray.evaluate.baselines import offline_pool
    from qpo_ray.evaluate.compare import best_single_on_train
    from qpo_ray.evaluate.generated import generated_vs_source
    from qpo_ray.evaluate.live import offline_rows_accuracy

    chosen = read_rows(run.loop_dir(loop) / "collect.parquet")
    pairs = [{"query": r["query"], "label": r["label"], "prompt": r["prompt"]} for r in chosen]
    pool = [p["prompt"] for p in offline_pool(store, 0)]
    reference: list[dict[str, str]] = []
    if cfg.collect.compare_pool:
        labels = dict.fromkeys((r["query"], r["label"]) for r in chosen)
        reference = [{"query": q, "label": lab, "prompt": p} for q, lab in labels for p in pool]
    rows = scores.score(pairs + reference, f"loop-{loop}", phase="collect", source=f"loop-{loop}", loop=loop)
    scored, ref_rows = rows[: len(pairs)], rows[len(pairs):]
    atomic_write_table(run.loop_dir(loop) / "scored.parquet", pa.Table.from_pylist(scored))
    info: dict[str, Any] = {"rows": len(scored),
                            "mean_reward": sum(r["reward"] for r in scored) / max(1, len(scored))}
    if ref_rows:
        best = best_single_on_train(offline_rows_accuracy(store, 0)[0], pool)
        gen = generated_vs_source([{**r, "new": c["new"]} for r, c in zip(scored, chosen, strict=True)], ref_rows,
                                  pool, best_single=best["prompt"] if best else None, seed=cfg.seed)
        atomic_write_json(run.loop_dir(loop) / "generated.json", gen)
        info["generated"] = {k: gen.get(k) for k in ("scored", "new", "new_share", "beats_pool", "queries")}
    return info


def merge(cfg: RunConfig, task: Task, run: RunDir, store: DatasetStore, loop: int) -> dict[str, Any]:
    """Commit v<loop> = v<loop-1> + the loop's rows that pass the merge rule (qpo_ray/grow.py)."""
    if loop in store.versions():  # committed before a crash, marker not yet written
        m = store.verify(loop)
        return {"rows": m.rows, "added": m.new_rows}
    store.verify(loop - 1)  # its keys decide which rows are new: read them only from a sound version
    rows = read_rows(run.loop_dir(loop) / "scored.parquet")
    threshold = cfg.task.threshold if cfg.task.threshold is not None else task.threshold
    fault_point("merge.commit")
    m, stats = merge_rows(store, loop - 1, loop, rows, threshold, note=f"loop {loop}")
    log.info("[loop %d] merged: %s → v%03d has %d rows", loop, stats, loop, m.rows)
    return {"rows": m.rows, "added": m.new_rows, **stats.__dict__}


def evaluate(cfg: RunConfig, task: Task, run: RunDir, store: DatasetStore, scores: RunScores, tracker: Tracker,
             loop: int) -> dict[str, Any]:
    """The baselines and (loop ≥ 1) the QPO methods on the held-out test queries (evaluate/compare.py)."""
    from qpo_ray.evaluate.live import evaluate_loop

    result = evaluate_loop(cfg, task, run, store, scores.score, loop)
    atomic_write_json(run.path / "eval" / f"loop-{loop}.json", result)
    for name, m in result["methods"].items():
        tracker.log(f"eval/{name}", {"accuracy": m["accuracy"]} if m["accuracy"] is not None else {}, loop=loop,
                      global_step=loop)
    return {"accuracy": {k: v["accuracy"] for k, v in result["methods"].items()}}
