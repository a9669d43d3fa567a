"""Reward formulas on hand-computed cases, and score_pairs' bookkeeping with an in-process engine."""

from __future__ import annotations

import pytest

from qpo_ray.config import load_config
from qpo_ray.data.schema import COLUMNS, pair_key, rows_to_table
from qpo_ray.score.engines.base import Components, ScoreRequest
from qpo_ray.score.pairs import score_pairs
from qpo_ray.score.rewards import compute_rewards, formula_for, prompt_accuracy, reward
from qpo_ray.tasks import load_task


def test_prompt_accuracy_groups_by_prompt():
    assert prompt_accuracy(["a", "b", "a", "a", "b"], [1, 0, 0, 1, 1]) == pytest.approx([2 / 3, 0.5, 2 / 3, 2 / 3, 0.5])


def test_prompt_accuracy_prior_pulls_rare_prompts_to_the_mean():
    prompts = ["pool"] * 80 + ["new"]
    correct = [1.0] * 40 + [0.0] * 40 + [1.0]  # the pool prompt 50% on 80 queries; a new one right once
    plain = prompt_accuracy(prompts, correct)
    assert plain[0] == pytest.approx(0.5) and plain[-1] == 1.0
    mean = 41 / 81
    shrunk = prompt_accuracy(prompts, correct, prior_pairs=4)
    assert shrunk[-1] == pytest.approx((1 + 4 * mean) / 5)  # one success does not read as 100%
    assert shrunk[0] == pytest.approx((40 + 4 * mean) / 84)  # well measured: moves by well under 1%
    assert abs(shrunk[0] - plain[0]) < 0.01
    with pytest.raises(ValueError, match="prior_pairs"):
        prompt_accuracy(prompts, correct, prior_pairs=-1)


def test_zero_shot_formula():
    # p1 scored on two queries (one right), p2 on one (right).
    rows = compute_rewards("zero_shot", ["p1", "p1", "p2"], [1.0, 0.0, 1.0], [0.5, 2.0, 1.25])
    # r = 10·correct + 10·acc(p) − NLL(gold)
    assert [r["reward"] for r in rows] == pytest.approx([10 + 5 - 0.5, 0 + 5 - 2.0, 10 + 10 - 1.25])
    assert [r["prompt_acc"] for r in rows] == pytest.approx([0.5, 0.5, 1.0])
    assert rows[1] == {"reward": pytest.approx(3.0), "correct": 0.0, "nll": 2.0, "prompt_acc": 0.5}


def test_few_shot_formula():
    # acc_fs = fraction of demo sets answered right; avg over the prompt's queries.
    rows = compute_rewards("few_shot", ["p", "p"], [0.8, 0.4], [3.0, 9.0])
    assert [r["reward"] for r in rows] == pytest.approx([10 * (0.8 + 0.6), 10 * (0.4 + 0.6)])


def test_math_formula():
    rows = compute_rewards("math", ["p", "p", "p", "q"], [1.0, 1.0, 0.0, 0.0], [0.3, 0.1, 0.9, 2.0])
    acc = 2 / 3
    assert [r["reward"] for r in rows] == pytest.approx([10 + 10 * acc - 0.3, 10 + 10 * acc - 0.1,
                                                         10 * acc - 0.9, -2.0])


def test_formula_choice():
    assert formula_for("classification", "zero_shot") == "zero_shot"
    assert formula_for("classification", "few_shot") == "few_shot"
    assert formula_for("math", "zero_shot") == "math"
    assert reward("few_shot", 1.0, 99.0, 0.5) == pytest.approx(15.0)  # NLL plays no part in few-shot
    assert reward("zero_shot", 1.0, 0.5, 0.5) == pytest.approx(14.5)


class TableEngine:
    """A real in-process engine whose answers are a fixed table (tests only count its calls)."""

    target = "table-target"

    def __init__(self, table):
        self.table, self.requests = table, []

    def score(self, requests: list[ScoreRequest]) -> list[Components]:
        self.requests += requests
        return [Components(*self.table[(r.query, r.prompt, r.demos is not None and r.demos[0][0])], tokens=3, calls=1)
                for r in requests]


def test_score_pairs_rows_reuse_and_order():
    task = load_task("emotion")
    cfg = load_config("tiny")
    (q1, l1), (q2, l2) = task.queries("train")[:2]
    eng = TableEngine({(q1, "A", False): (1.0, 0.5), (q2, "A", False): (0.0, 2.0), (q1, "B", False): (1.0, 1.0)})
    rows = score_pairs(eng, task, cfg, [{"query": q1, "prompt": "A"}, (q2, "A", l2), (q1, "B"), (q1, "A")],
                       source="loop-1", loop=1)
    assert len(eng.requests) == 3  # the repeated (q1, A) is scored once
    assert [(r["query"], r["prompt"]) for r in rows] == [(q1, "A"), (q2, "A"), (q1, "B"), (q1, "A")]
    assert rows[0] == rows[3]
    assert rows[0]["label"] == l1 and rows[0]["source"] == "loop-1" and rows[0]["loop"] == 1
    assert rows[0]["key"] == pair_key("emotion", cfg.target.model, "zero_shot", q1, "A")
    # acc(p) counts task.prompt_acc_prior pseudo-pairs at the call's mean correctness (2 of 3 pairs right).
    k = cfg.task.prompt_acc_prior
    assert k > 0
    acc_a, acc_b = (1 + k * 2 / 3) / (2 + k), (1 + k * 2 / 3) / (1 + k)
    assert rows[0]["reward"] == pytest.approx(10 + 10 * acc_a - 0.5)
    assert rows[2]["reward"] == pytest.approx(10 + 10 * acc_b - 1.0)
    assert set(rows[0]) == set(COLUMNS)
    rows_to_table(rows)  # valid schema rows

    known = {r["key"]: r for r in rows}
    before = len(eng.requests)
    again = score_pairs(eng, task, cfg, [(q1, "A"), (q2, "A")], known, source="eval", loop=2)
    assert len(eng.requests) == before  # known pairs cost no target call
    assert again[0]["source"] == "loop-1"  # answered from the known row, unchanged


def test_score_pairs_few_shot_aggregates_demo_sets():
    task = load_task("emotion")
    cfg = load_config("tiny", ["task.setting=few_shot", "task.demo_sets_collect=3", "task.num_demos=2"])
    q = task.queries("train")[0][0]
    sets = task.demo_sets(3, 2, cfg.seed, q)
    # Right under the first two demo sets, wrong under the third: acc_fs = 2/3.
    table = {(q, "P", s[0][0]): (float(i < 2), 1.0 + i) for i, s in enumerate(sets)}
    eng = TableEngine(table)
    (row,) = score_pairs(eng, task, cfg, [(q, "P")], source="loop-1", loop=1, phase="collect")
    assert [r.demos for r in eng.requests] == sets and all(r.setting == "few_shot" for r in eng.requests)
    assert row["correct"] == pytest.approx(2 / 3) and row["nll"] == pytest.approx(2.0)
    assert row["reward"] == pytest.approx(10 * (2 / 3 + 2 / 3))
    eng.requests.clear()
    cfg_test = load_config("tiny", ["task.setting=few_shot", "task.demo_sets_test=4", "task.num_demos=2"])
    eng.table = {(q, "P", s[0][0]): (1.0, 0.0) for s in task.demo_sets(4, 2, cfg.seed, q)}
    score_pairs(eng, task, cfg_test, [(q, "P")], source="eval", phase="test")
    assert len(eng.requests) == 4


def test_score_pairs_missing_label_is_an_error():
    from qpo_ray.errors import DataError

    with pytest.raises(DataError, match="no label"):
        score_pairs(TableEngine({}), load_task("emotion"), load_config("tiny"), [("unseen query", "P")],
                    source="x")
