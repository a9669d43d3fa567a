"""Tasks: loading and validation, rendering, demonstration sampling, math answer extraction."""

from __future__ import annotations

import json

import pytest
import yaml

from qpo_ray.errors import ConfigError, DataError
from qpo_ray.tasks import answers_match, extract_number, load_task, parse_number


def write_task(tmp_path, **over):
    data = {
        "name": "mini",
        "type": "classification",
        "labels": ["pos", "neg"],
        "verbalizers": {"pos": " positive", "neg": " negative"},
        "template": "{prompt}\nReview: {query}\nSentiment:",
        "demo_template": "Review: {query}\nSentiment: {label}",
        "fewshot_template": "{prompt}\n{demos}\nReview: {query}\nSentiment:",
        "threshold": 1.5,
        "queries_file": "q.jsonl",
        "prompts": [{"id": "none", "text": ""}, {"id": "ask", "text": "Is it {good}?"}],
    }
    data.update(over)
    data = {k: v for k, v in data.items() if v is not None}
    rows = [{"query": f"text {i}", "label": "pos" if i % 2 else "neg", "split": ("train", "collect", "test")[i % 3]}
            for i in range(12)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_from_path_and_queries(tmp_path):
    task = load_task(write_task(tmp_path))
    assert task.name == "mini" and task.type == "classification" and task.threshold == 1.5
    assert task.prompts == [("none", ""), ("ask", "Is it {good}?")]
    assert len(task.queries()) == 12
    assert [q for q, _ in task.queries("train")] == [f"text {i}" for i in range(0, 12, 3)]
    assert task.label_of("text 3") == "pos" and task.label_of("unknown") is None


def test_builtin_tasks_load():
    emo = load_task("emotion")
    assert emo.type == "classification" and set(emo.labels) == {"joy", "sadness", "anger", "fear"}
    assert all(len(emo.queries(s)) > 0 for s in ("train", "collect", "test"))
    math = load_task("math_demo")
    assert math.type == "math" and all(parse_number(lab) is not None for _, lab in math.queries())


def test_render_drops_empty_prompt_line_and_keeps_braces(tmp_path):
    task = load_task(write_task(tmp_path))
    assert task.render("", "great {film}") == "Review: great {film}\nSentiment:"
    assert task.render("Is it {good}?", "ok {query}") == "Is it {good}?\nReview: ok {query}\nSentiment:"
    demos = (("a", "pos"), ("b", "neg"))
    text = task.render("P", "q", demos)
    assert text == "P\nReview: a\nSentiment: positive\nReview: b\nSentiment: negative\nReview: q\nSentiment:"
    assert task.render("", "q", demos).startswith("Review: a\n")


def test_math_template_drops_middle_line(tmp_path):
    task = load_task("math_demo")
    text = task.render("", "What is 2+2?")
    assert text == "What is 2+2?\nEnd your reply with a line 'Final Answer: <number>'."
    assert task.render("Think.", "What is 2+2?").split("\n")[1] == "Think."


def test_demo_sets_seeded_and_exclude_query(tmp_path):
    task = load_task(write_task(tmp_path))
    train = [q for q, _ in task.queries("train")]
    a = task.demo_sets(5, 2, seed=7, exclude_query=train[0])
    assert a == task.demo_sets(5, 2, seed=7, exclude_query=train[0])
    assert a != task.demo_sets(5, 2, seed=8, exclude_query=train[0])
    assert len(a) == 5 and all(len(s) == 2 and len({q for q, _ in s}) == 2 for s in a)
    assert all(q != train[0] and q in train for s in a for q, _ in s)
    with pytest.raises(ConfigError, match="num_demos"):
        task.demo_sets(1, 4, seed=0, exclude_query=train[0])  # only 3 other train queries


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"type": "regression"}, "'type'"),
        ({"template": "no placeholder"}, r"'template' must contain '\{query\}'"),
        ({"verbalizers": {"pos": " positive"}}, r"no entry for label\(s\) \['neg'\]"),
        ({"prompts": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "duplicate prompt id 'a'"),
        ({"labels": None}, "missing key 'labels'"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"queries_file": "nope.jsonl"}, "nope.jsonl not found"),
        ({"fewshot_template": "{prompt} {query}"}, r"'fewshot_template' must contain '\{demos\}'"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path, over, match):
    path = write_task(tmp_path, **over)
    with pytest.raises(ConfigError, match=match) as e:
        load_task(path)
    assert str(path) in str(e.value)


def test_bad_query_line_names_line(tmp_path):
    path = write_task(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"query": "a", "label": "pos", "split": "train"}\n'
                                      '{"query": "b", "label": "meh", "split": "train"}\n')
    with pytest.raises(DataError, match=r"q.jsonl: line 2: label 'meh'"):
        load_task(path)


def test_unknown_task_lists_builtins():
    with pytest.raises(ConfigError, match="emotion"):
        load_task("no_such_task")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Final Answer: 1,234", 1234.0),
        ("The total is 1,234,567.89 dollars", 1234567.89),
        ("It drops to -5 degrees.", -5.0),
        ("\u22127 in unicode minus", -7.0),
        ("so 3/4 of the pie", 0.75),
        ("Final Answer: -3/4", -0.75),
        ("It costs $12.50.", 12.5),
        ("**Final Answer:** -$3,000.25", -3000.25),
        ("a 25% discount", 25.0),
        ("value .5", 0.5),
        ("3.14159", 3.14159),
        ("no number here", None),
        ("", None),
        ("5 - 3 = 2", 2.0),  # a spaced minus is an operator, not a sign
        ("Final Answer: 42\nbut earlier I said 7", 42.0),
        ("First 10, then 20", 20.0),
        ("End your reply with 'Final Answer: <number>'. I think 9", 9.0),
        ("Final Answer: 8\nwait, Final Answer: 9", 9.0),
        ("step1 x2 item3", None),  # digits glued to words are not answers
        ("divide 1/0", None),
    ],
)
def test_extract_number(reply, expected):
    got = extract_number(reply)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_answers_match():
    assert answers_match(14.0, "14", 1e-6)
    assert answers_match(1234.0, "1,234", 1e-6)
    assert answers_match(0.1 + 0.2, 0.3, 0.0)
    assert not answers_match(14.01, "14", 1e-6)
    assert answers_match(14.01, "14", 0.1)
    assert not answers_match(None, "14", 1.0)
