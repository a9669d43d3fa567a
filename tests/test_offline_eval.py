"""Replay evaluation (``qpo-ray eval --target replay``): the split, the one comparison (baselines, QPO methods,
paired intervals), the replay judge, the CLI's errors, and an end-to-end run on logs the test writes itself."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qpo_ray import cli
from qpo_ray.config import load_config
from qpo_ray.data.schema import normalize_text, rows_to_table, split_of
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import ConfigError
from qpo_ray.evaluate.compare import (
    MIN_TRAIN_COVERAGE,
    EvalQuery,
    accuracy_table,
    best_single_on_train,
    compare,
    pool_table,
)
from qpo_ray.evaluate.offline import evaluate_offline
from qpo_ray.evaluate.split import OfflineSplit

A, B, C = "The answer is:", "Let's think step by step:", "Three experts discuss it step by step:"


def _row(q: str, p: str, correct: float, alias: str = "x") -> dict:
    return {"task": "toy", "setting": "zero_shot", "target": "llm", "query": q, "label": "1", "prompt": p,
            "reward": correct, "correct": correct, "source": f"offline:{alias}", "loop": 0}


def _rows(spec: dict[str, dict[str, list[int]]]) -> list[dict]:
    """{query: {prompt: [correct of each recorded repeat]}} -> rows (one per repeat)."""
    return [_row(q, p, float(c)) for q, ps in spec.items() for p, cs in ps.items() for c in cs]


# Hand-made logs: 3 train queries (C is not recorded on q3: it covers 2/3 of them), with repeats.
TRAIN = {
    "q1 apples": {A: [1, 1], B: [1], C: [1]},
    "q2 pears": {A: [0], B: [1], C: [1]},
    "q3 plums": {A: [1, 0], B: [0, 0, 1]},
}


def test_accuracy_table_and_best_single_on_train():
    train = accuracy_table(_rows(TRAIN) + [_row("  Q1   APPLES ", " the answer is: ", 0.0)])  # same query, prompt
    assert train["q1 apples"][normalize_text(A)] == pytest.approx(2 / 3)
    best = best_single_on_train(train, [A, B, C])
    # C has the best train accuracy but covers < 90% of the train queries; B beats A.
    assert MIN_TRAIN_COVERAGE == 0.9 and best["prompt"] == B
    assert best["train_accuracy"] == pytest.approx((1 + 1 + 1 / 3) / 3) and best["train_coverage"] == 1.0
    assert best_single_on_train(train, [A, B, C], min_coverage=0.5)["prompt"] == C
    assert best_single_on_train(train, ["never recorded"]) is None


def test_compare_on_a_hand_made_table():
    queries = [EvalQuery(f"q{i}", group="even" if i % 2 == 0 else "odd") for i in range(4)]
    truth = {("q0", A): 1.0, ("q0", B): 0.0, ("q0", ""): 0.0,
             ("q1", A): 0.0, ("q1", B): 1.0, ("q1", ""): 1.0,
             ("q2", A): 0.5, ("q2", B): None, ("q2", ""): 0.0,  # B not recorded on q2
             ("q3", A): 1.0, ("q3", B): 1.0, ("q3", ""): 0.0,
             ("q0", "written"): 1.0, ("q1", "written"): 1.0}
    calls = []

    def judge(pairs):
        calls.append(list(pairs))
        return [(truth.get(p), {"seen": True}) for p in pairs]

    pool = [A, B, ""]
    table = pool_table(queries, pool, judge)
    assert table[2] == {A: 0.5, B: None, "": 0.0} and len(calls[0]) == 12
    qpo = {"qpo_greedy": ["written", "written", "the the the", A],  # q2's prompt has no answer: incorrect
           "qpo_rerank": [A, B, A, B]}
    res = compare(queries, pool, table, judge, qpo, best={"prompt": B, "train_accuracy": 0.9},
                  default_method="qpo_rerank")
    m = res["methods"]
    assert m["no_instruction"]["accuracy"] == pytest.approx(0.25)
    assert m["best_single"]["accuracy"] == pytest.approx(2 / 3) and m["best_single"]["n"] == 3  # q2 unknown
    assert m["random"]["accuracy"] == pytest.approx((1 / 3 + 2 / 3 + 0.25 + 2 / 3) / 4)
    assert m["oracle"]["accuracy"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert m["qpo_greedy"]["accuracy"] == pytest.approx(0.75) and m["qpo_rerank"]["accuracy"] == pytest.approx(7 / 8)
    assert res["default_method"] == "qpo_rerank"
    # paired: over the queries where both have a value
    vs = m["qpo_greedy"]["vs"]["best_single"]
    assert vs["n"] == 3 and vs["diff"] == pytest.approx((1 + 0 + 0) / 3) and vs["lo"] <= vs["diff"] <= vs["hi"]
    assert m["qpo_greedy"]["vs"]["no_instruction"]["n"] == 4
    assert m["qpo_greedy"]["prompts"] == {"prompts": 4, "distinct": 3, "verbatim_pool_share": 0.25,
                                          "new_share": None, "degenerate_share": 0.25}
    # per kind (even: q0, q2; odd: q1, q3), the pool prompt best on that kind's test queries: A, then B
    assert [r["methods"]["kind_oracle"]["prompt"] for r in res["per_query"]] == [A, B, A, B]
    assert m["kind_oracle"]["accuracy"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    claims = m["qpo_greedy"]["claims"]
    assert set(claims) == {"qpo_rerank", "kind_oracle", "oracle"} and "qpo_rerank" not in m["qpo_rerank"]["claims"]
    assert claims["qpo_rerank"]["diff"] == pytest.approx((0 + 0 - 0.5 + 0) / 4)
    again = compare(queries, pool, table, judge, qpo, best=None, earlier=[A, "written"])
    assert again["methods"]["qpo_greedy"]["prompts"]["new_share"] == 0.25  # "the the the"
    row = res["per_query"][2]
    assert row["group"] == "even" and row["methods"]["qpo_greedy"] == {"prompt": "the the the", "correct": 0.0,
                                                                         "seen": True}
    assert row["methods"]["oracle"]["prompt"] == A and row["methods"]["random"]["prompt"] is None
    with pytest.raises(ValueError, match="2 prompts for 4 queries"):
        compare(queries, pool, table, judge, {"qpo_greedy": ["a", "b"]}, best=None)


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
    assert split.prompt_text[normalize_text(A)] == A
    # Held out for rerank's margin: a seeded share of the train queries leaves the training rows only.
    split.hold_out(0.25, seed=1)
    val = set(split.val_acc)
    assert val and val < train_q and {normalize_text(q) for q in split.val_queries} == val
    assert {normalize_text(q) for q in split.train.column("query").to_pylist()} == train_q - val
    assert set(split.train_acc) == train_q  # the best single prompt is still chosen on every train query
    assert split.train.num_rows + split.val_rows + len(split.test_rows) == len(rows)
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
    logs = _store(tmp_path, _rows(TRAIN))
    rc, err = _cli(capsys, "eval", "--target", "live", "--data", str(logs), "--out", out)
    assert rc == 2 and "--target live needs --run-dir" in err
    rc, err = _cli(capsys, "eval", "--target", "live", "--run-dir", str(logs))
    assert rc == 2 and "no config.yaml" in err
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(logs))
    assert rc == 2 and "--target replay needs --data" in err
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
    # Fewer train rows than one optimizer step (the offline profile's train.batch_size is 64): refused before
    # anything is written, naming the rows, the queries and the knobs that set them.
    qs = [f"question {i}" for i in range(200)]
    train = [q for q in qs if split_of(q, 0.2, 0) == "train" and split_of(q, 0.1, 1) == "train"][:2]
    val = next(q for q in qs if split_of(q, 0.2, 0) == "train" and split_of(q, 0.1, 1) == "test")
    test = next(q for q in qs if split_of(q, 0.2, 0) == "test")
    few = _store(tmp_path, [_row(q, p, 1.0) for q in [*train, val, test] for p in (A, B)], name="few")
    rc, err = _cli(capsys, "eval", "--target", "replay", "--data", str(few), "--out", out)
    assert rc == 2 and ("has 4 rows (2 unique queries at --test-fraction 0.2, 1 more held out by "
                        "eval.val_fraction=0.1): too few for one optimizer step (train.batch_size=64 rows "
                        "across 1 worker(s))") in err, err
    assert not Path(out).exists()  # nothing was trained or written


# -- end to end on logs written here ----------------------------------------------------------------------
KINDS = {"apples": A, "boats": B}  # the prompt that answers each kind of question; C is right half the time


def _synthetic_logs(n: int = 72) -> list[dict]:
    """Questions of two kinds, three prompts each; which prompt works depends on the kind. Each row's
    correctness is the mean of 1-3 simulated repeats (as ``--repeats mean`` imports them)."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        kind = "apples" if i % 2 else "boats"
        q = (f"Tom has {i} apples and buys {i % 7} more. How many apples?" if kind == "apples"
             else f"A boat sails {i} miles, then {i % 5} more. How far did the boat go?")
        for p, alias in ((A, "A"), (B, "B"), (C, "C")):
            hit = 0.9 if p == KINDS[kind] else (0.5 if p == C else 0.1)
            draws = [rng.random() < hit for _ in range(rng.randint(1, 3))]
            rows.append(_row(q, p, sum(draws) / len(draws), alias))
    return rows


@pytest.mark.slow
def test_replay_eval_end_to_end_on_synthetic_logs(tmp_path, ray_local):
    rows = _synthetic_logs()
    data = _store(tmp_path, rows, name="logs-run")
    cfg = load_config("offline", ["policy.tiny_hidden=32", "train.batch_size=16", "train.micro_batch_size=16",
                                  "train.cpus_per_worker=1", "train.scratch.epochs=2", "eval.best_of_n=2"])
    out = tmp_path / "eval"
    res = evaluate_offline(cfg, data, out, test_fraction=0.25)

    # The split: no question on both sides; every row on one of them.
    s = res["split"]
    train_rows = DatasetStore(out).read_table(0, columns=["query"]).column("query").to_pylist()
    train_q = {normalize_text(q) for q in train_rows}
    saved = json.loads((out / "offline_eval.json").read_text())
    test_q = {normalize_text(x["query"]) for x in saved["per_query"]}
    # The offline profile fits rerank's margin on train-side queries held out of training.
    val_q = {normalize_text(r["query"]) for r in rows} - train_q - test_q
    assert val_q and all(split_of(q, cfg.eval.val_fraction, 1) == "test" for q in val_q)
    assert not train_q & test_q and len(val_q) == s["val_queries"] == res["rerank"]["val_queries"]
    assert s["train_rows"] + s["val_rows"] + s["test_rows"] == len(rows) == res["data"]["rows"]
    assert res["rerank"]["fitted"] and res["rerank"]["margin"] >= 0

    # Every method judged on every test query; the JSON holds every prompt and correctness.
    test_acc = accuracy_table([r for r in rows if normalize_text(r["query"]) in test_q])
    assert set(res["methods"]) == {"qpo_greedy", "qpo_best_of_n", "qpo_rerank", "best_single", "random", "oracle"}
    for row in saved["per_query"]:
        acc = test_acc[normalize_text(row["query"])]
        assert row["methods"]["oracle"]["correct"] == pytest.approx(max(acc.values()))
        for name in ("qpo_greedy", "qpo_best_of_n", "qpo_rerank"):
            m = row["methods"][name]
            if m["match"] == "none":  # an unmatched prompt counts as incorrect
                assert m["correct"] == 0.0 and m["matched"] is None
            else:  # else the recorded mean of the matched prompt on that query
                assert m["correct"] == pytest.approx(acc[m["matched"]])
        assert row["methods"]["qpo_rerank"]["match"] == "exact"  # rerank picks among the query's recorded prompts
    for name, m in res["methods"].items():
        vals = [row["methods"][name]["correct"] for row in saved["per_query"]]
        known = [v for v in vals if v is not None]
        assert m["accuracy"] == pytest.approx(sum(known) / len(known)) and m["n"] == len(known)
        assert m["ci"][0] <= m["accuracy"] <= m["ci"][1]
    best = res["methods"]["best_single"]
    assert best["prompt"] in (A, B, C) and res["methods"]["oracle"]["accuracy"] >= best["accuracy"]
    for name in ("qpo_greedy", "qpo_best_of_n", "qpo_rerank"):
        cmp = res["methods"][name]["vs"]["best_single"]
        assert cmp["lo"] <= cmp["diff"] <= cmp["hi"] and cmp["n"] == s["evaluated_test_queries"]

    # Rerank left the best single prompt only where r̂ rated another higher by more than the fitted margin.
    from qpo_ray.policy.generate import candidate_scores
    from qpo_ray.policy.model import QPOPolicy

    margin, default = res["rerank"]["margin"], best["prompt"]
    per_q = saved["per_query"]
    cands = [[p for p in (A, B, C) if normalize_text(p) in test_acc[normalize_text(r["query"])]] for r in per_q]
    scores = candidate_scores(QPOPolicy.load(out / "policy"), [r["query"] for r in per_q], cands)
    for r, cs, sc in zip(per_q, cands, scores, strict=True):
        chosen = r["methods"]["qpo_rerank"]["prompt"]
        if default in cs:
            gap = max(sc) - sc[cs.index(default)]
            assert (chosen != default) == (gap > margin), (chosen, gap, margin)
    assert "rerank margin" in (out / "offline_report.md").read_text()

    # Training ran through Ray Train; the report shows the intervals.
    tr = res["training"]
    assert tr["epochs_run"] == 2 and not tr["reused"] and (out / "policy" / "policy_config.json").is_file()
    report = (out / "offline_report.md").read_text()
    for frag in ("best single prompt on train", "per-query oracle", "QPO rerank", "95%", "Every recorded prompt"):
        assert frag in report

    # A rerun reuses the trained policy and gives the same numbers; another policy config is refused.
    again = evaluate_offline(cfg, data, out, test_fraction=0.25)
    assert again["training"]["reused"] and again["methods"] == res["methods"]
    with pytest.raises(ConfigError, match="another policy/train config"):
        evaluate_offline(load_config("offline", ["policy.tiny_hidden=48"]), data, out, test_fraction=0.25)


def test_offline_profile_loads():
    cfg = load_config("offline")
    assert cfg.policy.model == "tiny-gpt2" and cfg.policy.max_query_tokens == 64
    assert cfg.eval.max_test_queries is None
