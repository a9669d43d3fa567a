"""End to end: a full 2-loop tiny run (real Ray Data, Train + DeepSpeed, Serve). Resuming it after a kill is the
drill in test_faults.py."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest

from qpo_ray.config import load_config
from qpo_ray.data.store import DatasetStore
from qpo_ray.tasks import load_task
from qpo_ray.tracking import read_metrics
from tests.e2e import dataset_rows, qpo, scored_keys

pytestmark = pytest.mark.slow


def test_versions_grow_by_exactly_the_merged_rows(reference_run):
    store = DatasetStore(reference_run)
    assert store.versions() == [0, 1, 2]
    m0 = store.verify(0)
    for v in (1, 2):
        m = store.verify(v)
        prev, cur = set(dataset_rows(reference_run, v - 1)), dataset_rows(reference_run, v)
        assert len(cur) == len(set(cur)) == m.rows
        assert prev <= set(cur)  # every previous row survives unchanged
        added = set(cur) - prev
        assert len(added) == m.new_rows
        assert all(src == f"loop-{v}" for _, _, src in added)
        merged = json.loads((reference_run / "steps" / f"loop-{v}.merge.json").read_text())
        assert merged["kept"] == m.new_rows
        assert (m.reward_min, m.reward_max) == (m0.reward_min, m0.reward_max)  # normalisation unchanged
    keys = [k for k, _, _ in dataset_rows(reference_run)]
    assert len(keys) == len(set(keys))


def test_each_loop_trains_on_the_last_version_with_its_schedule(reference_run):
    """Loop 1 trains from the pretrained LM, loop 2 fine-tunes loop 1's policy (tiny: ZeRO-0 on one worker,
    gradient accumulation 2), each with its schedule's epochs and learning rate."""
    cfg = load_config("tiny")
    tcfg = cfg.train
    assert (tcfg.zero_stage, tcfg.num_workers, tcfg.batch_size // tcfg.micro_batch_size) == (0, 1, 2)
    for loop, sched in ((1, cfg.train.scratch), (2, cfg.train.finetune)):
        train = json.loads((reference_run / "steps" / f"loop-{loop}.train.json").read_text())
        assert train["epochs"] == sched.epochs and train["resumed_from_epoch"] is None
        assert train["final"]["lr"] == sched.lr and math.isfinite(train["final"]["loss"])
        assert train["policy"] == str(reference_run / "policy" / f"loop-{loop}")


def test_bootstrap_scores_every_train_pair_once(reference_run):
    cfg = load_config("tiny")
    task = load_task(cfg.task.name)
    n_pairs = len(task.queries("train")[: cfg.task.max_train_queries]) * len(task.prompts[: cfg.task.max_prompts])
    store = DatasetStore(reference_run)
    assert store.manifest(0).rows == n_pairs
    boot = json.loads((reference_run / "steps" / "bootstrap.json").read_text())
    assert boot["target_calls"] == n_pairs
    counts = Counter(scored_keys(reference_run))
    assert max(counts.values()) == 1, "a pair was sent to the target twice"


def test_report_is_consistent_with_the_data(reference_run):
    for name in ("report.md", "accuracy.png", "metrics.jsonl", "config.yaml"):
        assert (reference_run / name).is_file(), name
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))
    report = (reference_run / "report.md").read_text()
    assert "QPO, the policy's prompt" in report and "loop 2" in report and "95%" in report
    assert "- **target precision**: float32" in report  # greedy answers can differ by precision: say which
    evals = {e: json.loads((reference_run / "eval" / f"loop-{e}.json").read_text()) for e in (0, 1, 2)}
    qpo_methods = {"qpo_greedy", "qpo_best_of_n", "qpo_rerank"}  # tiny: last_prompt head, best_of_n 2
    assert not qpo_methods & set(evals[0]["methods"]) and qpo_methods <= set(evals[2]["methods"])
    cfg = load_config("tiny")
    for e in evals.values():
        m = e["methods"]
        assert m["oracle"]["accuracy"] >= m["best_single"]["accuracy"] - 1e-9
        assert m["oracle"]["accuracy"] >= m["random"]["accuracy"] - 1e-9
        assert m["best_single"]["n"] == cfg.eval.max_test_queries == len(e["per_query"])
        for row in e["per_query"]:  # every method's prompt and correctness, for every test query
            assert set(row["methods"]) == set(m)
            pool = [p for p in row["methods"] if p not in ("random",)]
            assert all(row["methods"][p]["correct"] is not None for p in pool)
        # the tables in report.md show these numbers
        for name in ("oracle", "best_single"):
            assert f"{m[name]['accuracy']:.3f}" in report
    for name in qpo_methods:
        vs = evals[2]["methods"][name]["vs"]["best_single"]
        assert vs["n"] == cfg.eval.max_test_queries and vs["lo"] <= vs["diff"] <= vs["hi"]
        assert f"{100 * vs['diff']:+.1f} [{100 * vs['lo']:+.1f}, {100 * vs['hi']:+.1f}]" in report
    metrics = read_metrics(reference_run)
    ev = [r for r in metrics if r["event"] == "eval/qpo_greedy"]
    assert [r["loop"] for r in ev] == [1, 2]
    assert math.isclose(ev[-1]["accuracy"], evals[2]["methods"]["qpo_greedy"]["accuracy"])
    train = [r for r in metrics if r["event"] == "train"]
    steps = [r["global_step"] for r in train]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert {r["loop"] for r in train} == {1, 2}


def test_loops_score_new_prompts_and_measure_them_against_the_pool(reference_run):
    """Each loop's target calls go to the screened candidates (a share of them new prompts) and to the pool on
    the same collect queries; the pool rows are a measurement and do not join the dataset."""
    cfg = load_config("tiny")
    summary = json.loads((reference_run / "eval" / "summary.json").read_text())
    report = (reference_run / "report.md").read_text()
    store = DatasetStore(reference_run)
    for loop in (1, 2):
        collect = json.loads((reference_run / "steps" / f"loop-{loop}.collect.json").read_text())["screen"]
        # the samples and the beams (repeats among them included)
        assert collect["sampled"] > cfg.collect.num_queries * cfg.collect.num_candidates
        assert collect["chosen"] <= cfg.collect.num_queries * cfg.collect.scored_per_query
        chosen = pq.read_table(reference_run / "loops" / f"loop-{loop}" / "collect.parquet").to_pylist()
        assert len(chosen) == collect["chosen"] and sum(r["new"] for r in chosen) == collect["chosen_new"] > 0
        gen = summary["generated"][str(loop)]
        assert (gen["scored"], gen["new"]) == (collect["chosen"], collect["chosen_new"])
        assert f"{gen['new']} of them with a new prompt" in report
        # every loop-<t> row in the dataset is a chosen pair, never a pool pair scored for the comparison
        added = [r for r in store.read_table(loop).to_pylist() if r["source"] == f"loop-{loop}"]
        assert {(r["query"], r["prompt"]) for r in added} <= {(r["query"], r["prompt"]) for r in chosen}
    assert set(summary["loop_over_loop"]) >= {"qpo_greedy", "qpo_rerank"}
    assert "Loop over loop: loop 2 − loop 1" in report


@pytest.mark.parametrize("loop", [1, 2])
def test_generate_gives_the_prompts_each_loop_was_evaluated_with(reference_run, loop, tmp_path):
    """Each evaluated loop's policy records its evaluation (inference.json); ``generate`` with no flags gives
    that evaluation's headline prompts, and with ``--set eval.method=…`` its other methods' (same seed)."""
    from qpo_ray import cli
    from qpo_ray.policy.served import read_inference

    pdir = reference_run / "policy" / f"loop-{loop}"
    res = json.loads((reference_run / "eval" / f"loop-{loop}.json").read_text())
    rec = read_inference(pdir)
    assert rec is not None and rec.evaluation == f"live evaluation of loop {loop}"
    assert rec.run_config == "../../config.yaml" and rec.settings.method == load_config("tiny").eval.method
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query": row["query"]}) + "\n" for row in res["per_query"]))
    for method, flags in [(res["default_method"], []), ("qpo_best_of_n", ["--set", "eval.method=best_of_n"]),
                          ("qpo_rerank", ["--set", "eval.method=rerank"])]:
        out = tmp_path / f"{method}.jsonl"
        assert cli.main(["generate", "--policy", str(pdir), "--in", str(queries), "--out", str(out), *flags]) == 0
        got = [json.loads(x)["prompt"] for x in out.read_text().splitlines()]
        assert got == [row["methods"][method]["prompt"] for row in res["per_query"]], method


def test_run_refuses_an_existing_run_dir(reference_run):
    p = qpo("run", "--config", "tiny", "--set", f"run_dir={reference_run}", check=False)
    assert p.returncode == 2 and "--resume" in p.stderr


def test_console_is_quiet_shows_progress_and_ends_with_a_summary(reference_run):
    console = (reference_run.parent / "console.txt").read_text(encoding="utf-8")
    out, err = console.split("\n--- stderr\n")
    # Ray's own output (Serve's access log, the Train controller, worker prints) stays in Ray's log files...
    for noise in ("ServeReplica", "PlacementGroupCleaner", "TrainController", "RayTrainWorker", "SplitCoordinator"):
        assert noise not in console, f"{noise} lines reached the console"
    # ...which the run links, beside its own log
    assert (reference_run / "logs" / "ray").is_symlink() and (reference_run / "logs" / "ray").is_dir()
    assert "[loop-2.eval] done" in (reference_run / "logs" / "driver.log").read_text(encoding="utf-8")
    # one meter per step, each closing at its total
    cfg = load_config("tiny")
    task = load_task(cfg.task.name)
    pairs = min(len(task.prompts), cfg.task.max_prompts) * min(len(task.queries("train")), cfg.task.max_train_queries)
    assert f"score bootstrap: {pairs}/{pairs} req (100%)" in err
    closing = [line for line in err.splitlines() if line.startswith("train scratch v000:")][-1]
    done = re.match(r"train scratch v000: (\d+)/(\d+) step \(100%\)", closing)
    assert done and done[1] == done[2] != "0" and f"epoch {cfg.train.scratch.epochs}/" in closing, closing
    assert f"sample loop-1: {cfg.collect.num_queries}/{cfg.collect.num_queries} query (100%)" in err
    # the summary: table, report, wall time, target calls; it ends the console, and the scoring pool's
    # teardown puts no failed Ray task before or after it
    assert "report:" in out and "wall time:" in out and "target calls:" in out
    assert out.rstrip().splitlines()[-1].startswith("logs:"), out[-2000:]
    for noise in ("graceful_shutdown failed", "listen_for_change failed", "The actor is dead"):
        assert noise not in console, f"{noise!r} reached the console"
    calls = sum(json.loads(p.read_text())["target_calls"] for p in (reference_run / "steps").glob("*.json"))
    assert f"target calls: {calls:,}" in out
