"""Importers never mislabel a row: ambiguous log folders, log/query length mismatches, empty
re-imports, and records that name one key or column twice. Fixtures are made here, in tmp_path."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qpo_ray.cli import main
from qpo_ray.cli_import import add_import_args
from qpo_ray.data.importers import (
    ImportOptions,
    ImportReport,
    corr_files,
    import_to_store,
    load_prompts,
    load_queries,
    parse_mapping,
    read_csv,
    read_jsonl,
    read_oirl,
    read_parquet,
)
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import ConfigError, DataError
from qpo_ray.evaluate.split import resolve_data

PROMPTS = {"nan": "The answer is:", "CoT": "Let's think step by step."}
N_TRAIN, N_TEST = 12, 5


def _truth(question: str, alias: str) -> bool:
    """The recorded correctness of (question, prompt): a hash, so a row joined to the wrong question is
    wrong about half the time."""
    return hashlib.sha256(f"{question}|{alias}".encode()).digest()[0] % 2 == 0


def _layout(root: Path) -> dict[str, Path]:
    """Prompt-OIRL's train/test layout: gsm_corr_<alias>.txt has one line per train.jsonl question,
    gsm_test_corr_<alias>.txt one per test.jsonl question, in one log folder."""
    questions = {"train": [f"Train question {i}: what is {i} plus {i + 1}?" for i in range(N_TRAIN)],
                 "test": [f"Test question {i}: what is {i} times 3?" for i in range(N_TEST)]}
    logs = root / "logs" / "gsm"
    logs.mkdir(parents=True)
    for split, qs in questions.items():
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, q in enumerate(qs):
                f.write(json.dumps({"question": q, "answer": str(i)}) + "\n")
        infix = "" if split == "train" else "test_"
        for alias in PROMPTS:
            lines = "".join(f"({i}, {_truth(q, alias)})\n" for i, q in enumerate(qs))
            (logs / f"gsm_{infix}corr_{alias}.txt").write_text(lines)
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    return {"logs": logs, "train": root / "train.jsonl", "test": root / "test.jsonl", "prompts": root / "prompts.json",
            "run": root / "run"}


def _import(p: dict[str, Path], queries: str, *extra: str) -> list[str]:
    return ["data", "import", "--format", "oirl", "--run-dir", str(p["run"]), "--logs", str(p["logs"]),
            "--queries", str(p[queries]), "--prompts", str(p["prompts"]), "--target", "m", "--task", "gsm",
            "--split", "all", *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("qpo-ray: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- which files are logs -------------------------------------------------------------------------------


def test_two_logs_for_one_alias_is_an_error_naming_both(tmp_path, capsys):
    p = _layout(tmp_path)
    assert main(_import(p, "train")) == 2
    logs = p["logs"]
    assert _error(capsys) == (
        f"qpo-ray: error: {logs}: 2 log files map to prompt alias 'CoT' under --log-pattern '*_corr_{{alias}}.txt': "
        f"{logs}/gsm_corr_CoT.txt and {logs}/gsm_test_corr_CoT.txt (so do 1 more alias(es)); choose one set with "
        "--log-pattern, e.g. 'gsm_corr_{alias}.txt' or 'gsm_test_corr_{alias}.txt'\n")
    assert DatasetStore(p["run"]).versions() == []


def test_log_pattern_picks_one_set(tmp_path):
    p = _layout(tmp_path)
    assert {a: f.name for a, f in corr_files(p["logs"], "gsm_corr_{alias}.txt").items()} == {
        "CoT": "gsm_corr_CoT.txt", "nan": "gsm_corr_nan.txt"}
    assert {a: f.name for a, f in corr_files(p["logs"], "*_test_corr_{alias}.txt").items()} == {
        "CoT": "gsm_test_corr_CoT.txt", "nan": "gsm_test_corr_nan.txt"}
    with pytest.raises(DataError, match="2 log files map to prompt alias 'CoT'"):  # '*' spans 'corr' and 'test_corr'
        corr_files(p["logs"], "gsm_*_{alias}.txt")
    for bad, msg in (("gsm_corr.txt", "exactly once"), ("{alias}_{alias}.txt", "exactly once"),
                     ("sub/{alias}.txt", "not a path")):
        with pytest.raises(ConfigError, match=msg):
            corr_files(p["logs"], bad)
    with pytest.raises(DataError, match=r"no log file matches --log-pattern 'dev_corr_\{alias\}.txt'"):
        corr_files(p["logs"], "dev_corr_{alias}.txt")


def test_train_and_test_logs_import_as_two_versions_with_every_label_right(tmp_path, capsys):
    p = _layout(tmp_path)
    assert main(_import(p, "train", "--log-pattern", "gsm_corr_{alias}.txt")) == 0
    assert main(_import(p, "test", "--log-pattern", "gsm_test_corr_{alias}.txt")) == 0
    out = capsys.readouterr().out
    assert f"import {p['logs']}: 24 row(s) written to dataset v000" in out
    assert f"import {p['logs']}: 10 row(s) written to dataset v001" in out
    store = DatasetStore(p["run"])
    assert store.versions() == [0, 1] and store.verify(1).rows == 34 and store.manifest(1).new_rows == 10
    rows = store.read_table(1).to_pylist()
    alias_of = {text: a for a, text in PROMPTS.items()}
    assert len({(r["query"], r["prompt"]) for r in rows}) == 34
    for r in rows:  # every row carries the correctness logged for its own question
        assert r["correct"] == float(_truth(r["query"], alias_of[r["prompt"]])), r
    assert sum(r["query"].startswith("Test") for r in rows) == 2 * N_TEST


# -- a log must have one line per query row --------------------------------------------------------------


def test_a_log_of_another_length_is_an_error(tmp_path, capsys):
    p = _layout(tmp_path)
    assert main(_import(p, "train", "--log-pattern", "gsm_test_corr_{alias}.txt")) == 2
    assert _error(capsys) == (
        f"qpo-ray: error: {p['logs']}/gsm_test_corr_nan.txt: 5 log line(s) but 12 query row(s) in {p['train']} "
        "(2 of 2 logs differ); line (i, ok) is the answer to query row i, so this log was scored on other "
        "questions: name them with --queries FILE (its logs picked with --log-pattern) or --query-rows START:STOP, "
        "or join by index anyway with --allow-partial-logs (a warning counts what is left unmatched)\n")
    assert main(_import(p, "test", "--log-pattern", "gsm_corr_{alias}.txt", "--strict")) == 2
    assert "gsm_corr_nan.txt: 12 log line(s) but 5 query row(s)" in _error(capsys)
    assert DatasetStore(p["run"]).versions() == []


def test_allow_partial_logs_warns_with_the_unmatched_counts(tmp_path, caplog):
    p = _layout(tmp_path)
    opts = ImportOptions(constants={"target": "m"}, log_pattern="gsm_test_corr_{alias}.txt", allow_partial_logs=True)
    report = ImportReport()
    with caplog.at_level(logging.WARNING):
        rows = [r for t in read_oirl(p["logs"], p["train"], p["prompts"], opts, report) for r in t.to_pylist()]
    assert len(rows) == 2 * N_TEST and report.skipped == 0
    want = [f"{p['logs']}/gsm_test_corr_{a}.txt: 5 log line(s) for 12 query row(s) (--allow-partial-logs): "
            "0 log line(s) matched no query row, 7 query row(s) have no line in this log" for a in PROMPTS]
    assert report.warnings == want and all(w in caplog.text for w in want)
    # A log longer than the table: its extra lines name no row; they are bad lines too, counted and quoted.
    opts = ImportOptions(constants={"target": "m"}, log_pattern="gsm_corr_{alias}.txt", allow_partial_logs=True)
    report = ImportReport()
    rows = [r for t in read_oirl(p["logs"], p["test"], p["prompts"], opts, report) for r in t.to_pylist()]
    assert len(rows) == 2 * N_TEST and report.skipped == 2 * (N_TRAIN - N_TEST)
    assert "7 log line(s) matched no query row, 0 query row(s) have no line" in report.warnings[0]
    assert f"{p['logs']}/gsm_corr_nan.txt line 6: index 5 is past the query table (5 rows)" in report.skipped_examples


def _slice_layout(root: Path) -> dict[str, Path]:
    """Prompt-OIRL's own layout: one question file; nan/CoT logged on every row, gpt4_0 only on the last
    N_TEST rows, its lines indexed from 0."""
    qs = [f"Question {i}: what is {i} minus 1?" for i in range(N_TRAIN + N_TEST)]
    logs = root / "logs" / "gsm"
    logs.mkdir(parents=True)
    (root / "all.jsonl").write_text("".join(json.dumps({"question": q, "answer": i}) + "\n" for i, q in enumerate(qs)))
    for alias, rows in (("nan", qs), ("CoT", qs), ("gpt4_0", qs[N_TRAIN:])):
        (logs / f"gsm_corr_{alias}.txt").write_text("".join(f"({i}, {_truth(q, alias)})\n" for i, q in enumerate(rows)))
    (root / "prompts.json").write_text(json.dumps({**PROMPTS, "gpt4_0": "Solve it carefully."}))
    return {"logs": logs, "all": root / "all.jsonl", "prompts": root / "prompts.json", "run": root / "run"}


def test_logs_of_a_slice_of_the_queries_import_with_aliases_and_query_rows(tmp_path, capsys):
    p = _slice_layout(tmp_path)
    assert main(_import(p, "all")) == 2
    assert "gsm_corr_gpt4_0.txt: 5 log line(s) but 17 query row(s) in" in _error(capsys)
    assert main(_import(p, "all", "--aliases", "nan,CoT")) == 0
    assert main(_import(p, "all", "--aliases", "gpt4_*", "--query-rows", f"{N_TRAIN}:")) == 0
    out = capsys.readouterr().out
    assert "34 row(s) written to dataset v000" in out and "5 row(s) written to dataset v001" in out
    rows = DatasetStore(p["run"]).read_table(1).to_pylist()
    alias_of = {"The answer is:": "nan", "Let's think step by step.": "CoT", "Solve it carefully.": "gpt4_0"}
    assert len(rows) == 39 and all(r["correct"] == float(_truth(r["query"], alias_of[r["prompt"]])) for r in rows)
    assert sorted(int(r["label"]) for r in rows if r["prompt"] == "Solve it carefully.") == list(range(12, 17))
    assert main(_import(p, "all", "--aliases", "gpt4_*", "--query-rows", "12:99")) == 2
    assert "--query-rows 12:99: " in _error(capsys)
    assert main(_import(p, "all", "--query-rows", "twelve")) == 2
    assert _error(capsys) == ("qpo-ray: error: --query-rows 'twelve': expected START:STOP or START: "
                              "(row numbers from 0)\n")
    with pytest.raises(DataError, match="no log file matches --log-pattern .* with --aliases 'ghost'"):
        corr_files(p["logs"], aliases=("ghost",))


# -- re-imports ------------------------------------------------------------------------------------------


def test_a_reimport_that_adds_nothing_commits_nothing(tmp_path, capsys):
    p = _layout(tmp_path)
    train = _import(p, "train", "--log-pattern", "gsm_corr_{alias}.txt")
    assert main(train) == 0 and main(train) == 0
    out = capsys.readouterr().out.splitlines()
    assert (f"import {p['logs']}: no new rows: all 24 row(s) to write are already in dataset v000; "
            "no version committed") in out
    store = DatasetStore(p["run"])
    assert store.versions() == [0]
    # Only the rows v000 lacks are committed; a later re-import builds on the newest version.
    assert main(_import(p, "test", "--log-pattern", "gsm_test_corr_{alias}.txt")) == 0
    assert main(train) == 0
    assert "all 24 row(s) to write are already in dataset v001" in capsys.readouterr().out
    assert store.versions() == [0, 1] and store.manifest(1).new_rows == 10


def test_a_partly_new_import_commits_only_the_new_rows(tmp_path):
    p = _layout(tmp_path)
    opts = ImportOptions(constants={"target": "m", "task": "gsm"}, log_pattern="gsm_corr_{alias}.txt")
    import_to_store(p["run"], "oirl", logs=p["logs"], queries=p["train"], prompts=p["prompts"], opts=opts)
    more = tmp_path / "more.json"
    more.write_text(json.dumps({**PROMPTS, "new": "Answer briefly."}))
    (p["logs"] / "gsm_corr_new.txt").write_text("".join(f"({i}, True)\n" for i in range(N_TRAIN)))
    rep = import_to_store(p["run"], "oirl", logs=p["logs"], queries=p["train"], prompts=more, opts=opts)
    assert (rep.parent, rep.version, rep.rows_already_present, rep.rows_written) == (0, 1, 24, N_TRAIN)
    assert DatasetStore(p["run"]).verify(1).rows == 24 + N_TRAIN


def test_eval_skips_a_latest_version_that_added_nothing(tmp_path, caplog):
    p = _layout(tmp_path)
    opts = ImportOptions(constants={"target": "m"}, log_pattern="gsm_corr_{alias}.txt")
    import_to_store(p["run"], "oirl", logs=p["logs"], queries=p["train"], prompts=p["prompts"], opts=opts)
    store = DatasetStore(p["run"])
    store.commit(iter(()), parent=0, source="empty import")  # a version that adds no rows
    assert store.versions() == [0, 1] and store.manifest(1).new_rows == 0
    with caplog.at_level(logging.WARNING):
        assert resolve_data(p["run"], None)[1] == 0
    assert "the latest dataset v001 added no rows; using v000, the newest that did" in caplog.text
    assert resolve_data(p["run"], 1)[1] == 1  # an explicit version is taken as asked


# -- a key or column named twice -------------------------------------------------------------------------


MAP = parse_mapping("query=question,prompt=instruction,reward=score,label=gold")
CONST = {"task": "t", "target": "m"}


def test_jsonl_duplicate_key_is_a_bad_row(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"question": "q1", "instruction": "p", "score": 1, "gold": "x"}\n'
                   '{"question": "q2", "instruction": "p", "score": 1, "gold": "x", "score": 0}\n'
                   '{"question": "q3", "instruction": "p", "score": 0, "gold": "x", "meta": {"a": 1, "a": 2}}\n')
    report = ImportReport()
    rows = [r for t in read_jsonl(src, ImportOptions(mapping=MAP, constants=CONST), report) for r in t.to_pylist()]
    assert [r["query"] for r in rows] == ["q1"]
    assert report.skipped_examples == [f"{src} line 2: key 'score' appears twice in the JSON object",
                                       f"{src} line 3: key 'a' appears twice in the JSON object"]
    with pytest.raises(DataError, match=r"a\.jsonl line 2: key 'score' appears twice"):
        list(read_jsonl(src, ImportOptions(mapping=MAP, constants=CONST, strict=True)))


def test_csv_duplicate_column_is_a_bad_row(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text("question,instruction,score,gold, score\nq1,p,1,x,0\nq2,p,0,x,1\n")
    report = ImportReport()
    assert list(read_csv(src, ImportOptions(mapping=MAP, constants=CONST), report)) == []
    why = "column 'score' appears twice in the header (line 1)"
    assert report.skipped_examples == [f"{src} line 2: {why}", f"{src} line 3: {why}"]
    with pytest.raises(DataError, match=r"a\.csv line 2: column 'score' appears twice in the header \(line 1\)"):
        list(read_csv(src, ImportOptions(mapping=MAP, constants=CONST, strict=True)))


def test_cli_reports_a_duplicate_column(tmp_path, capsys):
    src = tmp_path / "a.csv"
    src.write_text("question,instruction,score,gold,gold\nq1,p,1,x,y\n")
    args = ["data", "import", "--format", "csv", "--input", str(src), "--run-dir", str(tmp_path / "run"),
            "--task", "t", "--target", "m", "--map", "query=question,prompt=instruction,reward=score,label=gold"]
    assert main(args) == 2
    assert f"no rows to import (0 valid, 0 in the other split, 1 bad line(s) skipped); e.g. {src} line 2: column " \
           "'gold' appears twice in the header (line 1)" in _error(capsys)


def test_parquet_duplicate_column_is_a_bad_row(tmp_path):
    src = tmp_path / "a.parquet"
    t = pa.Table.from_arrays([pa.array(["q1", "q2"]), pa.array(["p", "p"]), pa.array([1.0, 0.0]),
                              pa.array(["x", "x"]), pa.array([0.0, 1.0])],
                             names=["question", "instruction", "score", "gold", "score"])
    pq.write_table(t, src)
    report = ImportReport()
    assert list(read_parquet(src, ImportOptions(mapping=MAP, constants=CONST), report)) == []
    assert report.skipped_examples == [f"{src} row {n}: column 'score' appears twice in the parquet schema"
                                       for n in (1, 2)]


def test_oirl_inputs_with_a_name_twice(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"nan": "The answer is:", "CoT": "Think.", "nan": "Answer:"}')
    with pytest.raises(DataError, match=r"prompts\.json: prompt alias 'nan' appears twice"):
        load_prompts(prompts)
    queries = tmp_path / "q.jsonl"  # a bad query row keeps its index, so later rows stay aligned
    queries.write_text('{"question": "a?", "answer": 1}\n{"question": "b?", "answer": 2, "answer": 3}\n'
                       '{"question": "c?", "answer": 4}\n')
    report = ImportReport()
    table = load_queries(queries, report, ImportOptions())
    assert table[0] == ("a?", "1") and table[2] == ("c?", "4")
    assert table[1] == f"{queries} line 2: key 'answer' appears twice in the JSON object"
    csv = tmp_path / "q.csv"
    csv.write_text("Question,Numbers,Answer,Answer\nn number0,1,1,2\n")
    table = load_queries(csv, report, ImportOptions())
    assert table == [f"{csv} line 2: column 'Answer' appears twice in the header (line 1)"]


def test_label_help_says_a_row_needs_a_label():
    parser = argparse.ArgumentParser()
    add_import_args(parser)
    (label,) = [a for a in parser._actions if "--label" in a.option_strings]
    assert "''" not in label.help and "non-empty label" in label.help and label.default is None
