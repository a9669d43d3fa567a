"""Bad input gets one clear error naming the file/row/column or config key, and a non-zero exit (issue 8).

Every case goes through the real CLI entry point, as a user would hit it.
"""

from __future__ import annotations

import json
import re

import pytest

from qpo_ray.cli import main

MAP = "query=question,prompt=instruction,reward=score,label=gold"


def _jsonl(path, *rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def _import(tmp_path, name, *rows):
    f = _jsonl(tmp_path / name, *rows)
    return ["data", "import", "--format", "jsonl", "--input", str(f), "--run-dir", str(tmp_path / "run"),
            "--task", "t", "--target", "m", "--map", MAP, "--strict"]


OK = {"question": "how are you", "instruction": "Be nice.", "score": 1.5, "gold": "joy"}

CASES = {
    "missing column": (lambda t: _import(t, "a.jsonl", {k: v for k, v in OK.items() if k != "score"}),
                       r"a\.jsonl line 1: column 'score' \(mapped to reward\) is missing"),
    "mistyped column": (lambda t: _import(t, "a.jsonl", {**OK, "score": "high"}),
                        r"a\.jsonl line 1: column 'score': 'high' is not a number"),
    "NaN reward": (lambda t: _import(t, "a.jsonl", OK, b'{"question": "q2", "instruction": "p", "score": NaN, '
                                     b'"gold": "joy"}'), r"a\.jsonl: row 2, column 'reward': nan is not a finite"),
    "inf reward": (lambda t: _import(t, "a.jsonl", {**OK, "score": float("inf")}), r"column 'reward': inf"),
    "empty query": (lambda t: _import(t, "a.jsonl", {**OK, "question": ""}), r"row 1, column 'query': empty"),
    "empty prompt column": (lambda t: _import(t, "a.jsonl", {**OK, "instruction": None}), r"'prompt'"),
    "non-UTF-8 text": (lambda t: _import(t, "a.jsonl", b'{"question": "caf\xe9 \xff", "instruction": "p", '
                                         b'"score": 1, "gold": "joy"}'), r"a\.jsonl line 1: not valid UTF-8"),
    "empty dataset": (lambda t: _import(t, "a.jsonl"), r"no rows to import"),
    "unknown config key": (lambda t: ["run", "--set", "train.micro_batch_sze=4"],
                           r"unknown key 'train\.micro_batch_sze' \(did you mean 'train\.micro_batch_size'\?\)"),
    "unknown section": (lambda t: ["run", "--set", "trian.lr=1"], r"unknown key 'trian' \(did you mean 'train'\?\)"),
    "bad config value": (lambda t: ["run", "--set", "train.zero_stage=7"], r"'train\.zero_stage'"),
    "policy model path missing": (lambda t: ["run", "--set", f"run_dir={t}/r", "--set", "policy.model=/no/such/lm"],
                                  r"policy\.model '/no/such/lm': no such folder"),
    "saved policy missing": (lambda t: ["generate", "--policy", str(t / "nope"), "--in", str(_jsonl(t / "q.jsonl",
                                        {"query": "hi"}))], r"not a saved QPO policy"),
    "dataset version missing": (lambda t: ["train", "--data", str(t / "run" / "data" / "v000"), "--out", str(t / "p")],
                                r"dataset version v000 does not exist"),
    "resume of a non-run": (lambda t: ["run", "--resume", str(t)], r"not a qpo-ray run directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, tmp_path, capsys):
    make_args, message = CASES[case]
    rc = main(make_args(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("qpo-ray: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_duplicate_rows_in_d0_are_dropped_with_a_warning(tmp_path, capsys, caplog):
    rc = main(_import(tmp_path, "d.jsonl", OK, OK, {**OK, "question": "another"}))
    assert rc == 0
    from qpo_ray.data.store import DatasetStore

    m = DatasetStore(tmp_path / "run").manifest(0)
    assert (m.rows, m.duplicates_dropped) == (2, 1)
    assert "duplicate" in (capsys.readouterr().out + caplog.text)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["oversized query", "unreachable target"])
def test_target_errors_are_clear(case, tmp_path, capsys, ray_local):
    pairs = _jsonl(tmp_path / "pairs.jsonl", {"query": "word " * 2000 if case == "oversized query" else "hello",
                                              "prompt": "Be nice.", "label": "joy"})
    sets = ["--set", "target.model=tiny-llama"]
    if case == "unreachable target":
        sets += ["--set", "target.engine=openai", "--set", "target.base_url=http://127.0.0.1:9/v1",
                 "--set", "target.retries=1", "--set", "target.timeout_s=2"]
    rc = main(["score", "--config", "tiny", *sets, "--in", str(pairs), "--out", str(tmp_path / "o.parquet")])
    # Ray's own logs share stderr here; what the user is told is the last line.
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("qpo-ray: error: "), last
    expected = r"max_length" if case == "oversized query" else r"127\.0\.0\.1:9"
    assert re.search(expected, last), last
