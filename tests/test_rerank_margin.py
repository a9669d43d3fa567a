"""The abstaining rerank: ``pick``'s rule and the margin fitted on held-out queries."""

from __future__ import annotations

import pytest

from qpo_ray.evaluate.margin import fit_margin
from qpo_ray.policy.generate import pick


def test_pick_keeps_the_default_unless_the_best_beats_it_by_more_than_the_margin():
    cands, scores = ["a", "b", "c"], [0.1, 0.9, 0.5]
    assert pick(cands, scores) == "b"
    assert pick(cands, scores, default="c", margin=0.3) == "b"  # 0.9 - 0.5 > 0.3
    assert pick(cands, scores, default="c", margin=0.4) == "c"  # 0.4 is not more than 0.4
    assert pick(cands, scores, default="b", margin=0.0) == "b"
    assert pick(cands, scores, default="z", margin=5.0) == "b"  # a default that is not a candidate: plain argmax
    assert pick(["a", "b"], [0.2, 0.2]) == "a"  # ties: the earlier candidate


def test_fit_margin_switches_only_where_it_paid_off_on_validation():
    # Large r̂ gaps mark real gains (+1), small ones losses (-1): the margin must sit between them.
    scores, correct, default = [], [], []
    for gap, gain in [(3.0, 1.0), (2.5, 1.0), (2.0, 1.0), (0.5, -1.0), (0.4, -1.0), (0.3, -1.0), (0.2, -1.0)] * 10:
        scores.append([0.0, gap])
        correct.append([0.5, 0.5 + gain / 2])
        default.append(0)
    scores += [[1.0, 0.0]] * 10  # the default is already r̂'s best: never a switch
    correct += [[1.0, 0.0]] * 10
    default += [0] * 10
    scores.append([0.0, 9.0])  # no default among the candidates: not counted
    correct.append([0.0, 1.0])
    default.append(None)
    res = fit_margin(scores, correct, default)
    assert res["val_queries"] == 80
    assert 0.5 <= res["margin"] < 2.0
    assert res["val_gain_pts"] == pytest.approx(100 * 1.5 / 8) and res["switch_share"] == pytest.approx(3 / 8)
    assert 0 < res["val_gain_ci_pts"][0] < res["val_gain_pts"] < res["val_gain_ci_pts"][1]
    zero = res["curve"][0]
    assert zero["margin"] == 0.0 and zero["gain_pts"] == pytest.approx(100 * (1.5 - 2.0) / 8)
    never = res["curve"][-1]  # above the largest gap: never switch
    assert never["margin"] == 3.0 and never["switch_share"] == 0.0 and never["gain_pts"] == 0.0


def test_fit_margin_does_not_switch_on_a_gain_inside_its_interval():
    # One query in eight gains (+1 on 8 queries): positive on average, but a tie by its interval.
    scores = [[0.0, 1.0]] * 8
    correct = [[0.0, 1.0]] + [[0.0, 0.0]] * 7
    res = fit_margin(scores, correct, [0] * 8)
    assert res["curve"][0]["gain_pts"] > 0 and res["curve"][0]["gain_ci_pts"][0] <= 0
    assert res["switch_share"] == 0.0 and res["margin"] == 1.0


def test_fit_margin_abstains_when_switching_never_helped():
    res = fit_margin([[0.0, 1.0], [0.0, 2.0]], [[1.0, 0.0], [1.0, 1.0]], [0, 0])
    assert res["switch_share"] == 0.0 and res["val_gain_pts"] == 0.0 and res["margin"] == 2.0
    empty = fit_margin([[0.0, 1.0]], [[1.0, 0.0]], [None])
    assert empty["val_queries"] == 0 and empty["margin"] == 0.0
