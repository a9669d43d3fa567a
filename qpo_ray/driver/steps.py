"""The steps of a QPO run. Each reads its inputs from the run directory and persists its output there;
``driver.run`` decides which to (re)run."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from qpo_ray.atomic import atomic_write_json, atomic_write_table
from qpo_ray.collect import pick_collect_queries, sample_prompts
from qpo_ray.driver.session import Session, read_rows
from qpo_ray.grow import merge_rows
from qpo_ray.runs import fault_point

log = logging.getLogger("qpo_ray")


def bootstrap(s: Session) -> dict[str, Any]:
    """D0 when the user has prompts but no logs: score every (train query, pool prompt) pair once."""
    if s.store.latest() is not None:
        m = s.store.verify(0)
        log.info("[bootstrap] dataset v000 exists (%d rows): nothing to do", m.rows)
        return {"rows": m.rows}
    prompts = s.task.prompts[: s.cfg.task.max_prompts]
    queries = s.task.queries("train")[: s.cfg.task.max_train_queries]
    log.info("[bootstrap] scoring %d prompts × %d train queries", len(prompts), len(queries))
    by_text = {text: pid for pid, text in prompts}
    pairs = [{"query": q, "label": lab, "prompt": text} for _pid, text in prompts for q, lab in queries]
    rows = s.score(pairs, "bootstrap", phase="collect", source="offline", loop=0)
    for r in rows:
        r["source"] = f"offline:{by_text[r['prompt']]}"
    fault_point("bootstrap.commit")
    m = s.store.commit([pa.Table.from_pylist(rows)], version=0, source="bootstrap rows", note="D0: bootstrap")
    log.info("[bootstrap] committed v000: %d rows, reward range [%.3f, %.3f]", m.rows, m.reward_min, m.reward_max)
    return {"rows": m.rows, "reward_min": m.reward_min, "reward_max": m.reward_max}


def train(s: Session, loop: int) -> dict[str, Any]:
    """Loop 1 trains from the pretrained LM ("scratch"); later loops fine-tune the previous policy. The version
    is verified first (``train_policy``: files, content, size), also in a resumed run."""
    from qpo_ray.train import train_policy

    schedule = "scratch" if loop == 1 else "finetune"
    res = train_policy(s.cfg, store=s.store, version=loop - 1, out_dir=s.run.policy_dir(loop), schedule=schedule,
                       init_policy=s.run.policy_dir(loop - 1) if loop > 1 else None,
                       run_name=f"qpo-{s.run_id}-loop-{loop}")
    # The global step counts epochs over all loops; a resumed call logs only the epochs it trained.
    base = sum((s.run.done(f"loop-{t}.train") or {}).get("epochs", 0) for t in range(1, loop))
    done_before = len(res.history) - res.epochs_run
    for i, m in enumerate(res.epoch_metrics):
        s.tracker.log("train", m, loop=loop, global_step=base + done_before + i + 1)
    return {"epochs": len(res.history), "resumed_from_epoch": res.resumed_from_epoch, "policy": str(res.policy_dir),
            "final": res.metrics}


def collect(s: Session, loop: int) -> dict[str, Any]:
    """Sample one prompt per collect query, conditioned on the target reward (top-k then top-p)."""
    queries = pick_collect_queries(s.task.queries("collect"), s.cfg.collect.num_queries, loop, s.cfg.seed)
    log.info("[loop %d] sampling prompts for %d collect queries", loop, len(queries))
    rows = sample_prompts(s.run.policy_dir(loop), queries, s.cfg.collect, seed=s.cfg.seed * 1000 + loop,
                          desc=f"sample loop-{loop}")
    atomic_write_table(s.run.loop_dir(loop) / "collect.parquet", pa.Table.from_pylist(rows))
    return {"prompts": len(rows), "distinct": len({r["prompt"] for r in rows})}


def score(s: Session, loop: int) -> dict[str, Any]:
    pairs = read_rows(s.run.loop_dir(loop) / "collect.parquet")
    rows = s.score(pairs, f"loop-{loop}", phase="collect", source=f"loop-{loop}", loop=loop)
    atomic_write_table(s.run.loop_dir(loop) / "scored.parquet", pa.Table.from_pylist(rows))
    return {"rows": len(rows), "mean_reward": sum(r["reward"] for r in rows) / max(1, len(rows))}


def merge(s: Session, loop: int) -> dict[str, Any]:
    """Commit v<loop> = v<loop-1> + the loop's rows that pass the merge rule (grow/merge.py)."""
    if loop in s.store.versions():  # committed before a crash, marker not yet written
        m = s.store.verify(loop)
        return {"rows": m.rows, "added": m.new_rows}
    s.store.verify(loop - 1)  # its keys decide which rows are new: read them only from a sound version
    rows = read_rows(s.run.loop_dir(loop) / "scored.parquet")
    threshold = s.cfg.task.threshold if s.cfg.task.threshold is not None else s.task.threshold
    fault_point("merge.commit")
    m, stats = merge_rows(s.store, loop - 1, loop, rows, threshold, note=f"loop {loop}")
    log.info("[loop %d] merged: %s → v%03d has %d rows", loop, stats, loop, m.rows)
    return {"rows": m.rows, "added": m.new_rows, **stats.__dict__}


def evaluate(s: Session, loop: int) -> dict[str, Any]:
    """The baselines and (loop ≥ 1) the QPO methods on the held-out test queries (evaluate/compare.py)."""
    from qpo_ray.evaluate.live import evaluate_loop

    result = evaluate_loop(s, loop)
    atomic_write_json(s.run.path / "eval" / f"loop-{loop}.json", result)
    for name, m in result["methods"].items():
        s.tracker.log(f"eval/{name}", {"accuracy": m["accuracy"]} if m["accuracy"] is not None else {}, loop=loop,
                      global_step=loop)
    return {"accuracy": {k: v["accuracy"] for k, v in result["methods"].items()}}
