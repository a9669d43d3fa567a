"""Offline evaluation on recorded logs (``qpo-ray eval --target replay``): the split, the baselines, the
replay of generated prompts, the CLI's errors, and an end-to-end run on a slice of the real MAWPS logs."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

from qpo_ray import cli
from qpo_ray.config import load_config
from qpo_ray.data.importers import ImportOptions, import_to_store, normalize_text, split_of
from qpo_ray.data.schema import rows_to_table
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import ConfigError
from qpo_ray.evaluate.offline import (
    MIN_TRAIN_COVERAGE,
    OfflineSplit,
    accuracy_table,
    baselines,
    evaluate_offline,
    replay_generated,
)
from qpo_ray.score.replay import ReplayTable

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompt_oirl"
A, B, C = "The answer is:", "Let's think step by step:", "Three experts discuss it step by step:"
NAMES = {normalize_text(A): "A", normalize_text(B): "B", normalize_text(C): "C"}


def _row(q: str, p: str, correct: float, alias: str = "x") -> dict:
    return {"task": "toy", "setting": "zero_shot", "target": "llm", "query": q, "label": "1", "prompt": p,
            "reward": correct, "correct": correct, "source": f"offline:{alias}", "loop": 0}


def _rows(spec: dict[str, dict[str, list[int]]]) -> list[dict]:
    """{query: {prompt: [correct of each recorded repeat]}} -> rows (one per repeat)."""
    return [_row(q, p, float(c)) for q, ps in spec.items() for p, cs in ps.items() for c in cs]


# Hand-made logs: 6 queries × 3 prompts (C is missing on some), with repeats. Train = q1..q3, test = q4..q6.
TRAIN = {
    "q1 apples": {A: [1, 1], B: [1], C: [1]},
    "q2 pears": {A: [0], B: [1], C: [1]},
    "q3 plums": {A: [1, 0], B: [0, 0, 1]},  # C not recorded: C covers 2/3 of the train queries
}
TEST = {
    "q4 cars": {A: [1], B: [0], C: [1]},
    "q5 boats": {A: [1, 1, 0], B: [1]},
    "q6 trains": {A: [0], B: [0, 1], C: [0]},
}


def test_baselines_on_hand_made_logs():
    # Repeats may differ in whitespace/case: they are the same query and prompt.
    test_rows = _rows(TEST) + [_row("  Q5   BOATS ", " the answer is: ", 1.0)]  # q5/A becomes [1,1,0,1]
    train, test = accuracy_table(_rows(TRAIN)), accuracy_table(test_rows)
    assert test["q5 boats"][normalize_text(A)] == pytest.approx(3 / 4)
    res = baselines(train, test, names=NAMES)
    pp = {x["name"]: x for x in res["per_prompt"]}
    assert [x["name"] for x in res["per_prompt"]] == ["C", "B", "A"]  # by train accuracy
    assert pp["A"]["train_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3) and pp["A"]["train_coverage"] == 1.0
    assert pp["B"]["train_accuracy"] == pytest.approx((1 + 1 + 1 / 3) / 3) and pp["B"]["train_coverage"] == 1.0
    assert pp["C"]["train_accuracy"] == 1.0 and pp["C"]["train_coverage"] == pytest.approx(2 / 3)
    assert pp["A"]["test_accuracy"] == pytest.approx((1 + 3 / 4 + 0) / 3) and pp["A"]["test_coverage"] == 1.0
    assert pp["B"]["test_accuracy"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert pp["C"]["test_accuracy"] == pytest.approx(0.5) and pp["C"]["test_coverage"] == pytest.approx(2 / 3)
    assert pp["C"]["test_queries"] == 2 and pp["A"]["train_queries"] == 3
    # C has the best train accuracy but covers < 90 % of the train queries: B is the best single prompt.
    best = res["best_single_on_train"]
    assert res["min_train_coverage"] == MIN_TRAIN_COVERAGE == 0.9
    assert best["name"] == "B" and best["prompt"] == normalize_text(B)
    assert best["accuracy"] == pytest.approx(0.5) and best["coverage"] == 1.0 and best["accuracy_all"] == pytest.approx(0.5)
    assert res["oracle"]["accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert res["random_recorded"]["accuracy"] == pytest.approx((2 / 3 + (3 / 4 + 1) / 2 + 1 / 6) / 3)
    # With a lower coverage bar C qualifies; on test it covers 2 of 3 queries.
    low = baselines(train, test, names=NAMES, min_train_coverage=0.5)["best_single_on_train"]
    assert low["name"] == "C" and low["accuracy"] == pytest.approx(0.5)
    assert low["coverage"] == pytest.approx(2 / 3) and low["accuracy_all"] == pytest.approx(1 / 3)
    assert baselines(train, test, min_train_coverage=1.0)["best_single_on_train"]["prompt"] == normalize_text(B)


def test_replay_generated_counts_matches_and_unmatched_as_incorrect():
    rows = _rows(TEST)
    table = ReplayTable.from_rows(rows)
    table.lookup("q4 cars", A)  # earlier lookups are not counted in the evaluation
    queries = ["q4 cars", "q5 boats", "Q6  trains"]
    prompts = ["the answer is:", "Let us think step by step", "Write a poem."]
    res = replay_generated(table, queries, prompts, NAMES)
    assert res["matches"] == {"exact": 1, "approx": 1, "none": 1}
    assert [x["kind"] for x in res["per_query"]] == ["exact", "approx", "none"]
    assert [x["correct"] for x in res["per_query"]] == [1.0, 1.0, 0.0]
    assert res["accuracy"] == pytest.approx(2 / 3) and res["matched_accuracy"] == 1.0
    assert res["coverage"] == pytest.approx(2 / 3) and res["n"] == 3
    assert res["chosen"] == {"A": 1, "B": 1, "(unmatched)": 1}
    # q5's approx match is B, recorded once correct; q4/A exact. Both ≤ the per-query oracle.
    acc = accuracy_table(rows)
    for x in res["per_query"]:
        assert x["correct"] <= max(acc[normalize_text(x["query"])].values())


def _store(tmp_path: Path, rows: list[dict], name: str = "logs") -> Path:
    run = tmp_path / name
    DatasetStore(run).commit([rows_to_table(rows)])
    return run


def test_split_is_by_unique_query_with_zero_overlap(tmp_path):
    # 40 questions, each logged 3 times with whitespace/case variants and 2 prompts.
    rows = []
    for i in range(40):
        for variant in (f"How many apples, case {i}?", f"how many  apples, CASE {i}?", f" How many apples, case {i}? "):
            rows += [_row(variant, A, float(i % 2)), _row(variant, B, float(i % 3 == 0))]
    run = _store(tmp_path, rows)
    store = DatasetStore(run)
    split = OfflineSplit(store, 0, 0.3, seed=1)
    train_q = {normalize_text(q) for q in split.train.column("query").to_pylist()}
    test_q = {normalize_text(r["query"]) for r in split.test_rows}
    assert train_q and test_q and not train_q & test_q
    assert train_q | test_q == {normalize_text(f"How many apples, case {i}?") for i in range(40)}
    assert split.train.num_rows + len(split.test_rows) == len(rows)
    assert all(split_of(q, 0.3, 1) == "test" for q in test_q)
    assert len(split.test_queries) == len(test_q)  # one representative text per unique test query
    assert set(split.train_acc) == train_q and set(split.test_acc) == test_q
    other = OfflineSplit(store, 0, 0.3, seed=2)  # another seed, another split
    assert {normalize_text(q) for q in other.test_queries} != test_q


# -- CLI errors ------------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    if rc == 2:  # a user error is one line
        assert err.startswith("qpo-ray: error: ") and "\n" not in err, err
    return rc, err


def test_cli_eval_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    logs = _store(tmp_path, _rows(TRAIN) + _rows(TEST))
    rc, err = _cli(capsys, "eval", "--target", "live", "--data", str(logs), "--out", out)
    assert rc == 2 and "only 'replay'" in err and "python -m qpo_ray.jobs.evaluate" in err
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(tmp_path / "nope"), "--out", out)
    assert rc == 2 and "no such run directory" in err
    (tmp_path / "empty").mkdir()
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(tmp_path / "empty"), "--out", out)
    assert rc == 2 and "no dataset versions" in err and "--split all" in err
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(logs), "--version", "3", "--out", out)
    assert rc == 2 and "no dataset v003" in err and "have v000" in err
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(logs), "--test-fraction", "0", "--out", out)
    assert rc == 2 and "--test-fraction 0" in err
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(logs), "--out", str(logs))
    assert rc == 2 and "must differ from the --data run directory" in err
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(logs), "--out", out, "--set", "train.nope=1")
    assert rc == 2 and "unknown key 'train.nope'" in err
    # A dataset whose only question hashes to the train split (what an import with --split train gives).
    q = next(f"question {i}" for i in range(100) if split_of(f"question {i}", 0.2, 0) == "train")
    only_train = _store(tmp_path, [_row(q, A, 1.0), _row(q, B, 0.0)], name="only-train")
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(only_train), "--out", out)
    assert rc == 2 and "no test queries" in err and "--split all" in err
    assert not Path(out).exists()  # nothing was trained or written


# -- end to end on real logs -------------------------------------------------------------------------------


def _independent_best_on_train(store: DatasetStore) -> str:
    """The best single prompt on train, computed from the committed train rows with plain Python."""
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in store.read_table(0, columns=["query", "prompt", "correct"]).to_pylist():
        per[normalize_text(r["prompt"])][normalize_text(r["query"])].append(r["correct"])
    n_queries = len({q for qs in per.values() for q in qs})
    score = {p: (sum(sum(c) / len(c) for c in qs.values()) / len(qs), len(qs) / n_queries)
             for p, qs in per.items() if len(qs) / n_queries >= 0.9}
    return max(sorted(score), key=lambda p: score[p])


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason=f"real Prompt-OIRL data not found at {REAL} (../shared is absent)")
def test_offline_eval_end_to_end_on_real_mawps_slice(tmp_path, ray_local):
    t0 = time.time()
    logs = tmp_path / "mawps"
    logs.mkdir()
    aliases = ("nan", "CoT", "Dis")
    for alias in aliases:  # the first 150 log lines of three prompts
        lines = (REAL / "logs" / "mawps" / f"llama_mawps_corr_{alias}.txt").read_text().splitlines()[:150]
        (logs / f"llama_mawps_corr_{alias}.txt").write_text("\n".join(lines) + "\n")
    data = tmp_path / "logs-run"
    rep = import_to_store(data, "oirl", logs=logs, queries=REAL / "queries" / "cv_mawps", prompts=REAL / "prompts.json",
                          opts=ImportOptions(constants={"target": "llama-2-7b-chat"}, repeats="mean", split="all",
                                               allow_partial_logs=True))  # 150 of 7685 lines
    assert rep.skipped == 0 and rep.rows_written == rep.rows_read
    all_rows = DatasetStore(data).read_table(0).to_pylist()
    cfg = load_config("offline", ["policy.tiny_hidden=32", "policy.tiny_heads=2", "policy.max_prompt_tokens=12",
                                  "train.batch_size=16", "train.micro_batch_size=16", "train.cpus_per_worker=1",
                                  "train.scratch.epochs=2"])
    out = tmp_path / "eval"
    res = evaluate_offline(cfg, data, out, test_fraction=0.2, seed=0)

    # The split: no question on both sides; every row on one of them.
    s = res["split"]
    train_store = DatasetStore(out)
    train_q = {normalize_text(q) for q in train_store.read_table(0, columns=["query"]).column("query").to_pylist()}
    saved = json.loads((out / "offline_eval.json").read_text())
    test_q = {normalize_text(x["query"]) for x in saved["per_query"]}
    assert not train_q & test_q and train_q | test_q == {normalize_text(r["query"]) for r in all_rows}
    assert (s["train_queries"], s["test_queries"]) == (len(train_q), len(test_q)) and s["query_overlap"] == 0
    assert s["train_rows"] + s["test_rows"] == len(all_rows) == res["data"]["rows"]
    src, dst = DatasetStore(data).manifest(0), train_store.manifest(0)
    assert dst.rows == s["train_rows"] and (dst.reward_min, dst.reward_max) == (src.reward_min, src.reward_max)
    assert 0 < s["test_queries"] < s["train_queries"] and s["evaluated_test_queries"] == s["test_queries"]

    # Replay: one lookup per test query; unmatched ones count as incorrect.
    m = res["methods"]
    assert sum(res["replay"]["matches"].values()) == s["test_queries"] == m["qpo"]["n"]
    assert sum(m["qpo"]["chosen"].values()) == s["test_queries"]
    test_acc = accuracy_table([r for r in all_rows if normalize_text(r["query"]) in test_q])
    for x in saved["per_query"]:
        if x["kind"] == "none":
            assert x["correct"] == 0.0 and x["matched"] is None
        else:  # the replayed value is the recorded mean of that query's matched prompt
            assert x["correct"] == pytest.approx(test_acc[normalize_text(x["query"])][x["matched"]])
    assert m["qpo"]["accuracy"] == pytest.approx(sum(x["correct"] for x in saved["per_query"]) / s["test_queries"])

    # Baselines: values in [0, 1] and consistent with each other.
    best, oracle = m["best_single_on_train"], m["oracle"]["accuracy"]
    for v in (m["qpo"]["accuracy"], best["accuracy"], best["accuracy_all"], m["random_recorded"]["accuracy"], oracle):
        assert 0.0 <= v <= 1.0
    assert oracle >= best["accuracy_all"] and oracle >= m["qpo"]["accuracy"] and oracle >= m["random_recorded"]["accuracy"]
    assert oracle == pytest.approx(sum(max(ps.values()) for ps in test_acc.values()) / len(test_acc))
    assert best["prompt"] == _independent_best_on_train(train_store)
    assert best["train_coverage"] >= 0.9 and best["name"] in aliases
    assert {x["name"] for x in res["per_prompt"]} == set(aliases)
    nan = next(x for x in res["per_prompt"] if x["name"] == "nan")
    assert nan["test_coverage"] == 1.0
    assert nan["test_accuracy"] == pytest.approx(sum(ps[normalize_text("The answer is:")] for ps in test_acc.values())
                                                 / len(test_acc))

    # Training ran through Ray Train and left a policy; the report names the methods.
    tr = res["training"]
    assert tr["wall_s"] > 0 and tr["epochs_run"] == 2 and not tr["reused"] and tr["train_rows"] == s["train_rows"]
    assert (out / "policy" / "policy_config.json").is_file()
    report = (out / "offline_report.md").read_text()
    for frag in ("best single prompt on train", "per-query oracle", "QPO policy", "exact", "Every recorded prompt"):
        assert frag in report

    # A rerun reuses the trained policy (no Ray Train) and gives the same numbers; a changed policy config
    # is refused before anything is trained.
    again = evaluate_offline(cfg, data, out, test_fraction=0.2, seed=0)
    assert again["training"]["reused"] and again["training"]["wall_s"] == tr["wall_s"]
    assert again["methods"] == res["methods"]
    with pytest.raises(ConfigError, match="another policy/train config"):
        evaluate_offline(load_config("offline", ["policy.tiny_hidden=48"]), data, out)
    assert time.time() - t0 < 300, "keep the end-to-end offline evaluation small"


def test_offline_profile_loads():
    cfg = load_config("offline")
    assert cfg.policy.model == "tiny-gpt2" and cfg.policy.max_query_tokens == 64
    assert cfg.eval.max_test_queries is None and cfg.train.scratch.epochs >= 1
    assert os.path.basename(cfg.run_dir) == "offline"
