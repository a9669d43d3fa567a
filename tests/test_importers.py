"""Importers: generic jsonl/csv/parquet with a mapping, Prompt-OIRL logs, splits, streaming, bad lines."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qpo_ray.cli_import import add_import_args, run_import
from qpo_ray.data import importers as imp
from qpo_ray.data.importers import (
    ImportOptions,
    ImportReport,
    fill_numbers,
    import_to_store,
    load_queries,
    parse_corr_line,
    parse_mapping,
    read_csv,
    read_jsonl,
    read_oirl,
    read_parquet,
)
from qpo_ray.data.schema import SCHEMA, normalize_text, split_of
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures" / "oirl"
LOGS, QUERIES, PROMPTS = FIX / "logs" / "toy", FIX / "queries", FIX / "prompts.json"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompt_oirl"
OIRL_CONST = {"target": "llama-2-7b-chat", "task": "toy"}
# The toy logs are partial on purpose (CoT has 10 lines, gpt4_0 2, for 8 query rows).
TOY = {"constants": OIRL_CONST, "allow_partial_logs": True}


def _rows(tables) -> list[dict]:
    return [r for t in tables for r in t.to_pylist()]


def _oirl(**kw) -> tuple[list[dict], ImportReport]:
    report = ImportReport()
    opts = ImportOptions(constants=dict(OIRL_CONST), allow_partial_logs=True, **kw)
    return _rows(read_oirl(LOGS, QUERIES, PROMPTS, opts, report)), report


# -- Prompt-OIRL pieces -------------------------------------------------------------------------------


def test_fill_numbers_number10_is_not_number1():
    nums = " ".join(f"{i + 1}.0" for i in range(11))
    assert fill_numbers("holds number10 pens and number1 pencils", nums) == "holds 11.0 pens and 2.0 pencils"
    with pytest.raises(ValueError, match="number2"):
        fill_numbers("number0 and number2", "1 2")


def test_parse_corr_line_is_literal_only(tmp_path, monkeypatch):
    assert parse_corr_line("(12, True)") == (12, True)
    assert parse_corr_line(" (0, False) ") == (0, False)
    monkeypatch.chdir(tmp_path)
    for bad in ("__import__('os').system('touch PWNED')", "(1, Tru)", "(1, 1)", "(True, True)", "(-1, True)",
                "[1, True]", "(1, True, 2)", ""):
        with pytest.raises(ValueError):
            parse_corr_line(bad)
    assert not (tmp_path / "PWNED").exists()


def test_query_folds_concatenate_in_order_with_substitution():
    report = ImportReport()
    table = load_queries(QUERIES, report, ImportOptions())
    assert len(table) == 8  # bad rows keep their index so log lines stay aligned
    assert table[0] == ("Tom has 3.0 apples and gets 4.0 more . How many apples does he have ?", "7")
    assert table[1][0] == "A box holds 11.0 pens and 2.0 pencils . How many more pens than pencils ?"
    assert table[3][0].startswith("There are 9.0 birds , 2.0 fly")  # quoted CSV field with a comma
    assert isinstance(table[5], str) and "number2" in table[5]
    assert report.skipped == 1 and "fold1/train.csv line 3" in report.skipped_examples[0]
    assert imp.count_duplicate_queries(table) == (2, 5)  # rows 4 and 6 repeat rows 0 and 2 (whitespace)


def test_oirl_rows_and_bad_lines(caplog):
    with caplog.at_level(logging.WARNING):
        rows, report = _oirl()
    assert "2 of 8 query rows repeat an earlier question text" in caplog.text
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source"], []).append(r)
    assert {k: len(v) for k, v in by_src.items()} == {"offline:nan": 7, "offline:CoT": 4, "offline:gpt4_0": 2}
    assert report.rows_read == 13 and report.duplicate_queries == 2
    # 1 bad query row + nan's line for it + 6 bad CoT lines + the log of an alias not in prompts.json
    assert report.skipped == 9
    ex = "\n".join(report.skipped_examples)
    for frag in ("fold1/train.csv line 3", "toy_corr_nan.txt line 6: query 5 is unusable",
                 "toy_corr_CoT.txt line 3: not a tuple literal", "toy_corr_CoT.txt line 4: not a tuple literal",
                 "toy_corr_CoT.txt line 6: not valid UTF-8", "toy_corr_CoT.txt line 7: index 99 is past",
                 "toy_corr_CoT.txt line 8: index 3 appears twice", "toy_corr_CoT.txt line 9: correctness 1",
                 "toy_corr_extra.txt: alias 'extra' is not in the prompts file"):
        assert frag in ex
    assert any("ghost" in m for m in report.files_missing)
    assert report.warnings == [  # nan has 8 lines for 8 rows: no warning; 'extra' was never joined
        f"{LOGS}/toy_corr_CoT.txt: 10 log line(s) for 8 query row(s) (--allow-partial-logs): 6 log line(s) "
        "matched no query row, 4 query row(s) have no line in this log",
        f"{LOGS}/toy_corr_gpt4_0.txt: 2 log line(s) for 8 query row(s) (--allow-partial-logs): 0 log line(s) "
        "matched no query row, 6 query row(s) have no line in this log"]
    r0 = by_src["offline:nan"][0]
    assert r0["task"] == "toy" and r0["target"] == "llama-2-7b-chat" and r0["setting"] == "zero_shot"
    assert r0["prompt"] == "The answer is:" and r0["label"] == "7" and r0["loop"] == 0
    assert r0["reward"] == r0["correct"] == 1.0
    assert {r["reward"] for r in rows} == {0.0, 1.0}
    assert all(r["reward"] == r["correct"] for r in rows)


def test_oirl_strict_raises_on_first_bad_line():
    with pytest.raises(DataError, match=r"fold1/train.csv line 3: placeholder number2"):
        _oirl(strict=True)


def test_oirl_repeats_mean():
    rows, _ = _oirl(repeats="mean")
    tom = [r for r in rows if r["source"] == "offline:nan" and r["query"].startswith("Tom")]
    assert len(tom) == 1 and tom[0]["reward"] == tom[0]["correct"] == 0.5  # (0, True) and (4, False)


def test_oirl_partial_logs_are_an_error_by_default():
    with pytest.raises(DataError, match=r"toy_corr_CoT.txt: 10 log line\(s\) but 8 query row\(s\) in .*queries "
                                        r"\(2 of 3 logs differ\).*--allow-partial-logs"):
        read_oirl(LOGS, QUERIES, PROMPTS, ImportOptions(constants=dict(OIRL_CONST)))


def test_oirl_import_to_store(tmp_path):
    report = import_to_store(tmp_path / "run", "oirl", logs=LOGS, queries=QUERIES, prompts=PROMPTS,
                             opts=ImportOptions(**TOY))
    assert report.version == 0
    assert report.rows_written == 12 and report.duplicates_dropped == 1  # nan: rows 0 and 4 share a key
    store = DatasetStore(tmp_path / "run")
    m = store.verify(0)
    assert m.rows == 12 and (m.reward_min, m.reward_max) == (0.0, 1.0)
    # A second import adds nothing: every key is already in v000, so no version is committed.
    again = import_to_store(tmp_path / "run", "oirl", logs=LOGS, queries=QUERIES, prompts=PROMPTS,
                            opts=ImportOptions(**TOY))
    assert (again.version, again.parent, again.rows_written, again.rows_already_present) == (None, 0, 0, 13)
    assert store.versions() == [0]


def test_oirl_jsonl_query_source(tmp_path):
    report = ImportReport()
    opts = ImportOptions(constants={"target": "t"})
    rows = _rows(read_oirl(FIX / "logs" / "jsonl", FIX / "queries.jsonl", PROMPTS, opts, report))
    assert [r["query"] for r in rows] == ["What is 2 plus 3?", "What is 10 minus 4?", "What is 2 plus 3?",
                                         "What is 3 times 3?"]
    assert [r["label"] for r in rows] == ["5", "6", "5", "9.0"]
    assert rows[0]["task"] == "jsonl"  # default task: the log folder's name
    ex = "\n".join(report.skipped_examples)
    assert "queries.jsonl line 4: not JSON" in ex and "queries.jsonl line 5: 'question' missing" in ex
    assert "queries.jsonl line 6: not valid UTF-8" in ex
    assert report.skipped == 6  # 3 bad query lines + the 3 log lines that point at them


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"logs": FIX / "nope"}, "log folder not found"),
        ({"queries": FIX / "queries_missing"}, r"fold1/train.csv: missing"),
        ({"queries": FIX / "nope.csv"}, "query source not found"),
        ({"prompts": FIX / "nope.json"}, "prompts file not found"),
        ({"logs": FIX / "queries"}, r"no log file matches --log-pattern '\*_corr_\{alias\}.txt'"),
    ],
)
def test_oirl_missing_inputs_are_clear_errors(kw, msg):
    args = {"logs": LOGS, "queries": QUERIES, "prompts": PROMPTS, **kw}
    with pytest.raises(DataError, match=msg):
        read_oirl(args["logs"], args["queries"], args["prompts"], ImportOptions(**TOY))


def test_oirl_needs_target():
    with pytest.raises(DataError, match="--target"):
        read_oirl(LOGS, QUERIES, PROMPTS, ImportOptions())
    with pytest.raises(DataError, match="--logs is required"):
        imp.read_format("oirl", ImportOptions(), ImportReport(), queries=QUERIES, prompts=PROMPTS)


# -- splits -------------------------------------------------------------------------------------------


def test_split_of_is_by_normalised_text_and_seeded():
    q = "How many  apples does Tom have?"
    assert split_of(q, 0.3, 1) == split_of("how many apples does tom HAVE?", 0.3, 1)
    assert split_of(q, 0.0) == "train" and split_of(q, 1.0) == "test"
    texts = [f"question {i}" for i in range(3000)]
    share = sum(split_of(t, 0.2, 7) == "test" for t in texts) / len(texts)
    assert 0.17 < share < 0.23
    assert [split_of(t, 0.5, 1) for t in texts[:50]] != [split_of(t, 0.5, 2) for t in texts[:50]]


def _repeated_jsonl(path: Path, n_queries: int = 150, seed: int = 3) -> Path:
    """A JSONL log where each question appears several times, sometimes re-spaced or re-cased."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(4):
            for i in range(n_queries):
                q = f"Question number {i} about apples?"
                q = rng.choice([q, q.upper(), q.replace(" ", "  ")])
                rec = {"q": q, "p": rng.choice(["A", "B", "C"]), "ok": rng.random() < 0.5, "a": str(i)}
                f.write(json.dumps(rec) + "\n")
    return path


def test_split_by_unique_query_has_zero_overlap(tmp_path):
    src = _repeated_jsonl(tmp_path / "log.jsonl")
    base = {"mapping": parse_mapping("query=q,prompt=p,correct=ok,label=a"),
            "constants": {"task": "t", "target": "m"}, "test_fraction": 0.3, "seed": 5}
    tq = tmp_path / "test_queries.jsonl"
    tr = import_to_store(tmp_path / "a", "jsonl", path=src,
                         opts=ImportOptions(split="train", test_queries_out=str(tq), **base))
    te = import_to_store(tmp_path / "b", "jsonl", path=src, opts=ImportOptions(split="test", **base))
    train_q = {normalize_text(q) for q in DatasetStore(tmp_path / "a").read_table(0, ["query"])["query"].to_pylist()}
    test_q = {normalize_text(q) for q in DatasetStore(tmp_path / "b").read_table(0, ["query"])["query"].to_pylist()}
    assert train_q and test_q and not train_q & test_q
    assert len(train_q | test_q) == 150
    assert tr.rows_other_split == te.rows_written + te.duplicates_dropped
    listed = [json.loads(line) for line in tq.read_text().splitlines()]
    assert {normalize_text(r["query"]) for r in listed} == test_q
    assert tr.test_queries_written == len(listed) == tr.unique_queries["test"]


# -- streaming ----------------------------------------------------------------------------------------


def test_readers_stream_chunks_no_larger_than_chunk_size(tmp_path):
    tables = list(read_oirl(LOGS, QUERIES, PROMPTS, ImportOptions(**TOY, chunk_size=3)))
    assert len(tables) == 5 and all(0 < t.num_rows <= 3 for t in tables)
    assert all(t.schema == SCHEMA for t in tables)
    src = _repeated_jsonl(tmp_path / "log.jsonl", n_queries=40)
    opts = ImportOptions(mapping=parse_mapping("query=q,prompt=p,correct=ok,label=a"),
                         constants={"task": "t", "target": "m"}, chunk_size=16)
    sizes = [t.num_rows for t in read_jsonl(src, opts)]
    assert sum(sizes) == 160 and max(sizes) <= 16 and len(sizes) == 10


def test_import_to_store_streams_into_commit(tmp_path, monkeypatch):
    seen: list[int] = []
    real_commit = DatasetStore.commit

    def spy(self, chunks, **kw):
        def counted():
            for c in chunks:
                seen.append(c.num_rows)
                yield c
        return real_commit(self, counted(), **kw)

    monkeypatch.setattr(DatasetStore, "commit", spy)
    import_to_store(tmp_path, "oirl", logs=LOGS, queries=QUERIES, prompts=PROMPTS,
                    opts=ImportOptions(**TOY, chunk_size=4))
    assert seen == [4, 4, 4, 1]


# -- generic formats ----------------------------------------------------------------------------------


def test_generic_jsonl_with_mapping():
    report = ImportReport()
    opts = ImportOptions(mapping=parse_mapping("query=question,prompt=instruction,reward=score,label=answer"),
                         constants={"task": "qa", "target": "m"})
    rows = _rows(read_jsonl(FIX / "generic.jsonl", opts, report))
    assert [(r["query"], r["prompt"], r["reward"], r["label"]) for r in rows] == [
        ("Q one", "Be brief.", 1.5, "7"), ("Q one", "Think step by step.", 0.5, "7"), ("Q three", "", -2.0, "x")]
    assert all(r["correct"] is None and r["source"] == "offline:import" for r in rows)
    ex = "\n".join(report.skipped_examples)
    assert report.skipped == 5
    for frag in ("generic.jsonl line 3: not JSON", "line 4: expected a JSON object",
                 "line 5: column 'question' (mapped to query) is missing", "line 6: column 'score': 'abc'",
                 "line 7: not valid UTF-8"):
        assert frag in ex


def test_generic_csv_correctness_column():
    report = ImportReport()
    opts = ImportOptions(mapping=parse_mapping("query=question, prompt=instruction, correct=is_right, label=answer"),
                         constants={"task": "qa", "target": "m", "setting": "few_shot"})
    rows = _rows(read_csv(FIX / "generic.csv", opts, report))
    assert [(r["query"], r["correct"], r["reward"]) for r in rows] == [
        ("Q one", 1.0, 1.0), ("Q two, with a\nline break", 0.0, 0.0), ("Q six", 0.0, 0.0)]
    assert rows[0]["setting"] == "few_shot"
    ex = "\n".join(report.skipped_examples)
    assert report.skipped == 3
    assert "generic.csv line 5: column 'is_right': 'maybe'" in ex  # the record on lines 3-4 spans two lines
    assert "generic.csv line 6: expected 4 fields, got 3" in ex
    assert "generic.csv line 7: not valid UTF-8" in ex
    with pytest.raises(DataError, match="generic.csv line 5"):
        list(read_csv(FIX / "generic.csv", ImportOptions(mapping=opts.mapping, constants=opts.constants,
                                                         strict=True)))


def test_generic_parquet_and_same_named_columns(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["a", None, "c", "d"], "prompt": ["p", "p", "q", "q"],
                             "reward": ["1", "2", "3", "lots"], "label": ["x", "y", "z", "w"],
                             "task": ["t", "t", "t", "t"]}), path)
    report = ImportReport()
    rows = _rows(read_parquet(path, ImportOptions(constants={"target": "m"}), report))
    assert [(r["query"], r["reward"], r["task"]) for r in rows] == [("a", 1.0, "t"), ("c", 3.0, "t")]
    # Rows are numbered from 1 and called rows, whichever check finds the fault.
    assert report.skipped_examples == [f"{path}: row 2, column 'query': missing",
                                       f"{path} row 4: column 'reward': 'lots' is not a number"]
    with pytest.raises(DataError, match="not a readable parquet"):
        read_parquet(FIX / "generic.csv")


def test_a_row_without_a_label_is_rejected(tmp_path):
    opts = ImportOptions(mapping=parse_mapping("query=question,prompt=instruction,reward=score"),
                         constants={"task": "qa", "target": "m"})
    with pytest.raises(DataError, match=r"no rows to import.*row 1, column 'label': missing"):
        import_to_store(tmp_path, "jsonl", path=FIX / "generic.jsonl", opts=opts)
    opts.constants["label"] = "n/a"
    assert import_to_store(tmp_path, "jsonl", path=FIX / "generic.jsonl", opts=opts).rows_written == 3


def test_generic_missing_file_and_bad_mapping(tmp_path):
    with pytest.raises(DataError, match="JSONL input not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="--input is required"):
        import_to_store(tmp_path, "csv")
    for bad in ("query", "query=", "bogus=x", "query=a,query=b"):
        with pytest.raises(ConfigError):
            parse_mapping(bad)
    with pytest.raises(ConfigError):
        ImportOptions(split="dev")


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_args_and_run_import(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_import_args(parser)
    args = parser.parse_args(["--format", "oirl", "--run-dir", str(tmp_path), "--logs", str(LOGS),
                              "--allow-partial-logs", "--queries", str(QUERIES), "--prompts", str(PROMPTS),
                              "--target", "llama-2-7b-chat",
                              "--task", "toy", "--split", "train", "--test-fraction", "0.4", "--seed", "2",
                              "--test-queries-out", str(tmp_path / "tq.jsonl"), "--chunk-size", "5"])
    assert run_import(args) == 0
    out = capsys.readouterr().out
    assert "written to dataset v000" in out and "skipped 9 bad line(s)" in out
    assert "warning: " in out and "toy_corr_gpt4_0.txt: 2 log line(s) for 8 query row(s)" in out
    assert (tmp_path / "tq.jsonl").exists() and not (tmp_path / "tq.jsonl.tmp").exists()
    args.strict = True
    with pytest.raises(DataError, match="line 3"):
        run_import(args)
    assert DatasetStore(tmp_path).versions() == [0]  # the failed strict import left nothing behind


# -- real data ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real Prompt-OIRL data not found at {REAL}")
def test_real_mawps_reproduces_reference_accuracy(tmp_path):
    """nan on rows 0..5999 / 6000..7684 and the best GPT-4 prompt on the test rows (README figures)."""
    logs = tmp_path / "mawps"
    logs.mkdir()
    for alias in ("nan", "gpt4_8"):  # a slice of the folder: two of its 16 logs
        os.symlink(REAL / "logs" / "mawps" / f"llama_mawps_corr_{alias}.txt", logs / f"llama_mawps_corr_{alias}.txt")
    t0 = time.time()
    queries, prompts, const = REAL / "queries" / "cv_mawps", REAL / "prompts.json", {"target": "llama-2-7b-chat"}
    # gpt4_* logs hold rows 6000..7684, indexed from 0: joined with rows 0..1684 they would all be mislabelled.
    with pytest.raises(DataError, match=r"gpt4_8.txt: 1685 log line\(s\) but 7685 query row\(s\)"):
        read_oirl(logs, queries, prompts, ImportOptions(constants=const))
    report, test_report = ImportReport(), ImportReport()
    got = {"nan": [], "gpt4_8": []}
    for t in chain(read_oirl(logs, queries, prompts, ImportOptions(constants=const, aliases=("nan",)), report),
                   read_oirl(logs, queries, prompts, ImportOptions(constants=const, aliases=("gpt4_*",),
                                                                   query_rows=(6000, None)), test_report)):
        for src, q, c in zip(t["source"].to_pylist(), t["query"].to_pylist(), t["correct"].to_pylist(), strict=True):
            got[src.split(":", 1)[1]].append((q, c))
    assert report.skipped == test_report.skipped == 0 and not report.warnings + test_report.warnings
    assert len(got["nan"]) == 7685 and len(got["gpt4_8"]) == 1685
    assert [q for q, _ in got["gpt4_8"]] == [q for q, _ in got["nan"][6000:]]  # each on its own question
    nan = [c for _, c in got["nan"]]
    assert sum(nan[:6000]) / 6000 == pytest.approx(0.644, abs=0.01)
    assert sum(nan[6000:]) / 1685 == pytest.approx(0.646, abs=0.01)
    assert sum(c for _, c in got["gpt4_8"]) / 1685 == pytest.approx(0.587, abs=0.01)
    assert report.duplicate_queries == 7685 - 1744  # README: 1744 unique mawps questions
    assert time.time() - t0 < 20
