"""Replay scoring: exact / approximate / no match of a prompt among the recorded prompts of a query."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qpo_ray.data.importers import ImportOptions, import_to_store
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError
from qpo_ray.score.replay import MIN_SIMILARITY, ReplayTable, match_prompt, similarity

FIX = Path(__file__).parent / "fixtures" / "oirl"
COT = "Let's think step by step:"


def test_similarity_is_token_set_jaccard():
    assert similarity("Let's think step by step", "let us think, step by step!") == pytest.approx(4 / 6)
    assert similarity("step by step", "by step step") == 1.0  # order and repeats ignored
    assert similarity("", "") == 1.0 and similarity("", "Be brief") == 0.0
    assert MIN_SIMILARITY == 0.5


def test_match_prompt_rules():
    cands = [COT, "The answer is:", "Be concise."]
    m = match_prompt("  let's THINK step by   step: ", cands)
    assert (m.kind, m.prompt, m.similarity) == ("exact", "let's think step by step:", 1.0)
    m = match_prompt("Let us think step by step.", cands)
    assert m.kind == "approx" and m.prompt == "let's think step by step:" and m.similarity == pytest.approx(4 / 6)
    assert match_prompt("Let us think step by step.", cands, min_similarity=0.9).kind == "none"
    m = match_prompt("Write a poem.", cands)
    assert (m.kind, m.prompt) == ("none", None)
    assert match_prompt("anything", []).kind == "none"


def test_match_prompt_tie_breaks_by_difflib_then_text():
    # Both candidates share 2 of 4 tokens with the asked prompt (Jaccard 0.5) ...
    asked, near = "solve it now", "solve it quick"
    assert similarity(asked, near) == similarity(asked, "it solve later") == 0.5
    # ... the one with the closer character sequence wins, and the result does not depend on order.
    a = match_prompt(asked, [near, "it solve later"])
    b = match_prompt(asked, ["it solve later", near])
    assert a == b and a.prompt == near and a.kind == "approx"
    # Equal Jaccard and ratio: the alphabetically first text, whatever the order given.
    assert match_prompt("x", ["b a", "a b"]).kind == "none"
    assert match_prompt("a b c", ["c b a d", "d a b c"]) == match_prompt("a b c", ["d a b c", "c b a d"])


def _table() -> ReplayTable:
    t = ReplayTable()
    t.add("What is 2+2?", COT, correct=1.0, reward=10.0)
    t.add("what is  2+2?", COT, correct=0.0, reward=4.0)  # a repeat (normalised query and prompt)
    t.add("What is 2+2?", COT, correct=1.0, reward=7.0)
    t.add("What is 2+2?", "The answer is:", correct=0.0, reward=1.0)
    t.add("What is 3+3?", "Be concise.", correct=1.0, reward=5.0)
    return t


def test_lookup_means_repeats_and_counts_kinds():
    t = _table()
    assert len(t) == 5 and t.num_queries == 2
    r = t.lookup("What is 2+2?", COT)
    assert r.kind == "exact" and r.rows == 3
    assert r.correct == pytest.approx(2 / 3) and r.reward == pytest.approx(7.0)
    r = t.lookup("What is 2+2?", "Let us think step by step")
    assert r.kind == "approx" and r.correct == pytest.approx(2 / 3)
    # The nearest prompt must be one recorded for THE SAME query: "Be concise." belongs to 3+3 only.
    r = t.lookup("What is 2+2?", "Be concise.")
    assert (r.kind, r.correct, r.reward, r.rows) == ("none", None, None, 0)
    assert t.lookup("What is 5+5?", COT).kind == "none"  # unknown query
    assert t.report() == {"exact": 1, "approx": 1, "none": 2, "total": 4}
    results = [t.lookup(q, p) for q, p in [("What is 3+3?", "be concise."), ("What is 3+3?", COT)]]
    assert [x.kind for x in results] == ["exact", "none"]
    assert t.report()["total"] == 6
    t.reset_counts()
    assert t.report()["total"] == 0


def test_reward_only_and_correct_only_rows():
    t = ReplayTable()
    t.add("q", "p", reward=3.0)
    t.add("q", "p", correct=1.0)
    r = t.lookup("q", "p")
    assert (r.correct, r.reward, r.rows) == (1.0, 3.0, 2)
    with pytest.raises(ValueError):
        t.add("q", "p")


def test_from_jsonl_and_parquet_with_filters(tmp_path):
    rows = [
        {"task": "a", "query": "Q1", "prompt": "P one", "correct": True, "reward": 1.0},
        {"task": "a", "query": "Q1", "prompt": "P one", "correct": False, "reward": 0.0},
        {"task": "b", "query": "Q1", "prompt": "P two", "correct": True, "reward": 1.0},
    ]
    jl = tmp_path / "rec.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = ReplayTable.from_file(jl, task="a")
    assert len(t) == 2 and t.lookup("Q1", "p one").correct == 0.5
    pqf = tmp_path / "rec.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    assert len(ReplayTable.from_file(pqf)) == 3
    assert ReplayTable.from_file(pqf, task="b").lookup("Q1", "P one").kind == "none"  # Jaccard 1/3 < 0.5
    with pytest.raises(DataError, match="not found"):
        ReplayTable.from_file(tmp_path / "nope.parquet")
    pq.write_table(pa.table({"query": ["q"], "answer": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="needs columns"):
        ReplayTable.from_file(tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "prompt": "p", "correct": 1}\nnope\n')
    with pytest.raises(DataError, match="bad.jsonl line 2"):
        ReplayTable.from_file(tmp_path / "bad.jsonl")


def test_replay_of_an_imported_store(tmp_path):
    import_to_store(tmp_path, "oirl", logs=FIX / "logs" / "toy", queries=FIX / "queries",
                    prompts=FIX / "prompts.json",
                    opts=ImportOptions(constants={"target": "m", "task": "toy"}, allow_partial_logs=True))
    store = DatasetStore(tmp_path)
    rows = (r for b in store.iter_batches(store.latest()) for r in b.to_pylist())
    t = ReplayTable.from_rows(rows)
    assert len(t) == 12
    tom = "Tom has 3.0 apples and gets 4.0 more . How many apples does he have ?"
    assert t.lookup(tom, "The answer is:").correct == 1.0  # (0, True); idx 4's repeat was deduped by the store
    r = t.lookup(tom, "the answer is")  # punctuation is kept by the exact rule, ignored by Jaccard
    assert (r.kind, r.similarity, r.correct) == ("approx", 1.0, 1.0)
    assert t.report() == {"exact": 1, "approx": 1, "none": 0, "total": 2}
