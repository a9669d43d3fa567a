"""Paired bootstrap intervals and prompt statistics (qpo_ray.evaluate.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from qpo_ray.evaluate.stats import is_degenerate, paired_bootstrap, prompt_stats


def test_paired_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.7
    b = rng.random(400) < 0.5
    res = paired_bootstrap(a.astype(float).tolist(), b.astype(float).tolist())
    assert res["n"] == 400 and res["diff"] == pytest.approx(a.mean() - b.mean())
    assert res["lo"] < res["diff"] < res["hi"] and not res["tie"] and res["lo"] > 0
    small = paired_bootstrap(a[:20].astype(float).tolist(), b[:20].astype(float).tolist())
    assert small["hi"] - small["lo"] > res["hi"] - res["lo"]  # 20 queries: a wider interval
    seeded = [paired_bootstrap(a.tolist(), b.tolist(), seed=s)["lo"] for s in (3, 4)]
    assert seeded[0] != seeded[1]
    assert paired_bootstrap(a.tolist(), b.tolist()) == paired_bootstrap(a.tolist(), b.tolist())  # seeded


def test_paired_bootstrap_pairs_and_skips_unknowns():
    same = paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["diff"] == 0.0 and same["lo"] == same["hi"] == 0.0 and same["tie"]
    res = paired_bootstrap([1.0, None, 1.0, 0.0], [0.0, 1.0, None, 0.0])
    assert res["n"] == 2 and res["diff"] == pytest.approx(0.5)
    assert paired_bootstrap([None], [1.0]) == {"diff": None, "lo": None, "hi": None, "n": 0, "tie": True}
    with pytest.raises(ValueError, match="one per query"):
        paired_bootstrap([1.0], [1.0, 0.0])


@pytest.mark.parametrize("prompt,bad", [
    ("", True), ("   ", True), ("Classify the the the", True), ("Readify the the", False),
    ("step by step by step by", True), ("Let's think step by step:", False), ("!!!", True),
    ("Is this review positive or negative?", False), ("a b a b a b", True),
])
def test_degenerate_prompts(prompt, bad):
    assert is_degenerate(prompt) is bad


def test_prompt_stats():
    pool = ["Be brief.", "", "Answer in one word."]
    stats = prompt_stats(["be  brief", "Be brief.", "", "the the the", "Something new"], pool)
    assert stats == {"prompts": 5, "distinct": 4, "verbatim_pool_share": 0.6, "new_share": None,
                     "degenerate_share": 0.2}
    # new = in none of the earlier prompts (case, whitespace and punctuation aside)
    assert prompt_stats(["Something new!", "be brief", "Other"], pool, ["something  new", *pool])["new_share"] == 1 / 3
    # without an empty pool prompt, writing nothing is degenerate
    assert prompt_stats(["", "ok"], ["ok"])["degenerate_share"] == 0.5
    assert prompt_stats([], pool)["distinct"] == 0
