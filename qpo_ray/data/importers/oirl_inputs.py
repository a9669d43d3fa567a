"""The inputs a Prompt-OIRL log is joined with: the query table (log index -> question) and the prompts file.

Entry ``i`` of the query table is the question that log line ``(i, ok)`` was scored on, so an unusable
query row keeps its index (as the reason it is unusable) and later rows stay aligned with the logs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from qpo_ray.data.importers.common import BadRow, ImportOptions, ImportReport
from qpo_ray.data.importers.records import csv_header, csv_records, jsonl_records, require_file
from qpo_ray.data.schema import normalize_text
from qpo_ray.errors import DataError
from qpo_ray.jsonl import DuplicateKey, loads_strict

_PLACEHOLDER = re.compile(r"number(\d+)")
_FOLD = re.compile(r"^fold(\d+)$")

QueryRow = tuple[str, str] | str  # (question, gold answer), or why the query row is unusable


def load_prompts(path: str | Path) -> dict[str, str]:
    """The alias -> prompt text mapping (a JSON object, like Prompt-OIRL's prompts.json)."""
    p = require_file(path, "prompts file")
    try:
        data = loads_strict(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a JSON file ({e})") from None
    except DuplicateKey as e:
        raise DataError(f"{p}: prompt alias '{e}' appears twice (which text is meant is ambiguous)") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DataError(f"{p}: expected a JSON object mapping prompt alias -> prompt text")
    return data


def fill_numbers(question: str, numbers: str) -> str:
    """Replace each ``number<i>`` with the i-th space-separated entry of ``numbers``.

    One regex pass with a greedy ``\\d+`` so ``number10`` is never read as ``number1`` + "0"."""
    nums = numbers.split()

    def sub(m: re.Match[str]) -> str:
        i = int(m.group(1))
        if i >= len(nums):
            raise BadRow(f"placeholder number{i} but Numbers has {len(nums)} entr{'y' if len(nums) == 1 else 'ies'}")
        return nums[i]

    return _PLACEHOLDER.sub(sub, question)


def _fold_files(folder: Path) -> list[Path]:
    folds = sorted(((int(m.group(1)), d) for d in folder.iterdir() if d.is_dir() and (m := _FOLD.match(d.name))),
                   key=lambda t: t[0])
    if not folds:
        raise DataError(f"{folder}: no fold<k>/ folders with train.csv")
    files = []
    for _, d in folds:
        f = d / "train.csv"
        if not f.is_file():
            raise DataError(f"{f}: missing (every fold folder needs a train.csv; rows are indexed across folds)")
        files.append(f)
    return files


def _csv_queries(path: Path, report: ImportReport, opts: ImportOptions) -> Iterator[QueryRow]:
    header: list[str] | None = None
    ambiguous: str | None = None
    for n, rec, why in csv_records(path):
        where = f"{path} line {n}"
        if header is None:
            header, ambiguous = csv_header(path, n, rec, why, required=("Question", "Numbers", "Answer"))
            qi, ni, ai = header.index("Question"), header.index("Numbers"), header.index("Answer")
            continue
        why = why or ambiguous
        if why is None and len(rec) != len(header):
            why = f"expected {len(header)} fields, got {len(rec)}"
        if why is None:
            try:
                yield fill_numbers(rec[qi], rec[ni]).strip(), rec[ai].strip()
                continue
            except BadRow as e:
                why = str(e)
        report.bad(where, why, strict=opts.strict, max_examples=opts.max_examples)
        yield f"{where}: {why}"
    if header is None:
        raise DataError(f"{path}: empty CSV file (no header)")


def _jsonl_queries(path: Path, report: ImportReport, opts: ImportOptions) -> Iterator[QueryRow]:
    for _, _, n, rec, why in jsonl_records(path):
        if why is None:
            q, a = rec.get("question"), rec.get("answer")
            if not isinstance(q, str) or not q.strip():
                why = "'question' missing or not text"
            elif a is None or isinstance(a, bool | dict | list):
                why = "'answer' missing or not a string/number"
            else:
                yield q.strip(), str(a).strip()
                continue
        where = f"{path} line {n}"
        report.bad(where, why, strict=opts.strict, max_examples=opts.max_examples)
        yield f"{where}: {why}"


def load_queries(source: str | Path, report: ImportReport, opts: ImportOptions) -> list[QueryRow]:
    """The query table: entry ``idx`` is ``(question, answer)`` for log index ``idx``, or why it is unusable.

    ``source`` is a folder of ``fold<k>/train.csv`` (concatenated in fold order), a CSV file with
    ``Question``/``Numbers``/``Answer``, or a JSONL file with ``question``/``answer``."""
    p = Path(source)
    if not p.exists():
        raise DataError(f"query source not found: {p}")
    if p.is_dir():
        files = _fold_files(p)
        return [q for f in files for q in _csv_queries(f, report, opts)]
    if p.suffix.lower() in (".jsonl", ".json"):
        return list(_jsonl_queries(p, report, opts))
    return list(_csv_queries(p, report, opts))


def count_duplicate_queries(queries: list[QueryRow]) -> tuple[int, int]:
    """(query rows repeating an earlier normalised question text, unique question texts)."""
    seen: set[str] = set()
    dup = 0
    for q in queries:
        if isinstance(q, tuple):
            key = normalize_text(q[0])
            dup += key in seen
            seen.add(key)
    return dup, len(seen)
