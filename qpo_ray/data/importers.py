"""Importers: bring logged ``(query, prompt, reward)`` rows into the dataset store (DESIGN §4).

Formats
- ``jsonl`` / ``csv`` / ``parquet``: one row per record. A column mapping (``--map query=question,
  reward=score``) names the source column of each schema field; unmapped fields fall back to a constant
  given on the command line, then to a source column of the same name, then to a default
  (``setting=zero_shot``, ``label=""``, ``source=offline:import``, ``loop=0``). The reward comes from a
  reward column or, failing that, from a correctness column (``--map correct=is_right``: reward = correct
  as 0/1, and ``correct`` is filled too).
- ``oirl``: Prompt-OIRL correctness logs. A folder of ``*_corr_<alias>.txt`` files (each line a tuple
  literal ``(idx, True)``), a query source (a folder of CSV folds ``fold0..N/train.csv`` concatenated in
  fold order, or one CSV, or JSONL with ``question``/``answer``) and a prompts file (alias -> text). One
  row per log line: ``reward = correct = 1.0 if the target answered correctly else 0.0`` (raw reward;
  the store normalises later), ``source = offline:<alias>``, ``loop = 0``.

Splits are by unique query text: :func:`split_of` hashes the normalised text, so repeats of a question
(the Prompt-OIRL folds overlap ~4x) never land on both sides.

Everything streams: readers yield Arrow tables of at most ``chunk_size`` rows into
:meth:`DatasetStore.commit`. Only the OIRL query table (one entry per query, ~20k) is held.

Bad lines are reported with file and line number. ``strict`` raises :class:`DataError` on the first;
otherwise they are skipped, counted and the first few quoted in the :class:`ImportReport`.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from qpo_ray.data.schema import SCHEMA, SETTINGS, normalize_row
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet", "oirl")
SPLITS = ("train", "test", "all")
CHUNK_ROWS = 50_000
MAX_EXAMPLES = 20
# Schema fields a source column can be mapped to (ids are always recomputed from content).
MAPPABLE = ("query", "prompt", "reward", "correct", "label", "task", "target", "setting", "nll",
            "prompt_acc", "source", "loop")
DEFAULTS: dict[str, Any] = {"setting": "zero_shot", "label": "", "source": "offline:import", "loop": 0}
_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0"}
_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_PLACEHOLDER = re.compile(r"number(\d+)")
_FOLD = re.compile(r"^fold(\d+)$")


class _BadRow(ValueError):
    """One input record cannot become a row; the message says why (the caller adds where)."""


# -- options and report ----------------------------------------------------------------------------


@dataclass
class ImportOptions:
    """How to read and filter an import. ``constants`` holds command-line values (task, target, ...)."""

    mapping: dict[str, str] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    split: Literal["train", "test", "all"] = "all"
    test_fraction: float = 0.2
    seed: int = 0
    strict: bool = False
    chunk_size: int = CHUNK_ROWS
    # oirl: "first" = one row per log line (the store keeps the first of repeated (query, prompt) keys);
    # "mean" = one row per question text and prompt, reward = mean correctness over its repeats.
    repeats: Literal["first", "mean"] = "first"
    test_queries_out: str | None = None  # write the unique test-split queries here (JSONL)
    max_examples: int = MAX_EXAMPLES

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split: '{self.split}' is not one of {SPLITS}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ConfigError(f"test_fraction: {self.test_fraction} is not within [0, 1]")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: {self.chunk_size} must be >= 1")
        if self.repeats not in ("first", "mean"):
            raise ConfigError(f"repeats: '{self.repeats}' is not one of ('first', 'mean')")
        bad = sorted(set(self.mapping) - set(MAPPABLE))
        if bad:
            raise ConfigError(f"--map: unknown field(s) {bad}; mappable fields are {list(MAPPABLE)}")


@dataclass
class ImportReport:
    """What an import did. ``rows_written`` counts rows committed (after the split and the store's dedupe)."""

    source: str = ""
    rows_read: int = 0  # valid rows produced by the reader, before the split
    rows_other_split: int = 0  # valid rows left out because their query belongs to the other split
    rows_written: int = 0
    skipped: int = 0  # bad input lines (or records) skipped
    skipped_examples: list[str] = field(default_factory=list)
    duplicate_queries: int = 0  # oirl: query rows whose text repeats an earlier query row
    duplicates_dropped: int = 0  # rows the store dropped: their (task,target,setting,query,prompt) key repeats
    files_missing: list[str] = field(default_factory=list)
    unique_queries: dict[str, int] = field(default_factory=lambda: {"train": 0, "test": 0})
    test_queries_written: int = 0
    version: int | None = None

    def bad(self, where: str, why: str | None, *, strict: bool, max_examples: int = MAX_EXAMPLES) -> None:
        """Record one bad line: raise in strict mode, else count it and keep the first few messages.

        ``where`` names file and line; ``why`` may be None when ``where`` is already a full message."""
        msg = where if why is None else f"{where}: {why}"
        if strict:
            raise DataError(msg)
        self.skipped += 1
        if len(self.skipped_examples) < max_examples:
            self.skipped_examples.append(msg)

    def summary(self) -> str:
        lines = [
            f"import {self.source}: {self.rows_written} row(s) written"
            + (f" to dataset v{self.version:03d}" if self.version is not None else ""),
            f"  read {self.rows_read} valid row(s); {self.rows_other_split} in the other split; "
            f"{self.duplicates_dropped} duplicate key(s) dropped",
            f"  unique queries: train {self.unique_queries['train']}, test {self.unique_queries['test']}",
        ]
        if self.duplicate_queries:
            lines.append(f"  {self.duplicate_queries} query row(s) repeat an earlier question text")
        if self.test_queries_written:
            lines.append(f"  {self.test_queries_written} unique test queries written")
        if self.files_missing:
            lines.append(f"  missing: {', '.join(self.files_missing)}")
        if self.skipped:
            lines.append(f"  skipped {self.skipped} bad line(s), e.g.:")
            lines.extend(f"    {m}" for m in self.skipped_examples[:5])
        return "\n".join(lines)


# -- splits ----------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Whitespace collapsed and case folded: the identity of a question for splitting and matching."""
    return " ".join(text.split()).casefold()


def split_of(query_text: str, test_fraction: float, seed: int = 0) -> Literal["train", "test"]:
    """The split of a query, from a seeded hash of its normalised text (so repeats share a split)."""
    h = hashlib.sha256(f"{seed}\0{normalize_text(query_text)}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "test" if u < test_fraction else "train"


# -- line-level readers ----------------------------------------------------------------------------


def _require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} is not a file: {p}")
    return p


def _text_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield ``(line number, text, None)`` per line, or ``(n, None, why)`` for a line that is not UTF-8.

    Decoded line by line (strict) so one bad byte costs one line, not the file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if n == 1:
                text = text.lstrip("\ufeff")
            yield n, text.rstrip("\r\n"), None


def _csv_records(path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Yield ``(first line number, fields, None)`` per CSV record (header included), or ``(n, None, why)``.

    A quoted field may span lines, so the file is decoded with surrogateescape and a record holding
    escaped bytes is reported as not UTF-8."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        start = 1
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, None, f"malformed CSV ({e})"
                start = reader.line_num + 1
                continue
            if start == 1 and rec:
                rec[0] = rec[0].lstrip("\ufeff")
            if any(_SURROGATE.search(v) for v in rec):
                yield start, None, "not valid UTF-8"
            else:
                yield start, rec, None
            start = reader.line_num + 1


def _csv_dicts(path: Path, report: ImportReport, opts: ImportOptions,
               required: Iterable[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """CSV records as dicts keyed by the header; bad records are reported and skipped."""
    records = _csv_records(path)
    header: list[str] | None = None
    for n, rec, why in records:
        if why is not None:
            if header is None:
                raise DataError(f"{path} line {n}: unreadable header ({why})")
            report.bad(f"{path} line {n}", why, strict=opts.strict, max_examples=opts.max_examples)
            continue
        if header is None:
            header = [h.strip() for h in rec]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} (header: {header})")
            continue
        if not rec:  # a blank line
            continue
        if len(rec) != len(header):
            report.bad(f"{path} line {n}", f"expected {len(header)} fields, got {len(rec)}",
                       strict=opts.strict, max_examples=opts.max_examples)
            continue
        yield n, dict(zip(header, rec, strict=True))
    if header is None:
        raise DataError(f"{path}: empty CSV file (no header)")


# -- generic formats -------------------------------------------------------------------------------


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"query=question,prompt=instruction"`` -> ``{"query": "question", "prompt": "instruction"}``."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, col = part.partition("=")
        name, col = name.strip(), col.strip()
        if not eq or not name or not col:
            raise ConfigError(f"--map: '{part}' is not FIELD=COLUMN")
        if name not in MAPPABLE:
            raise ConfigError(f"--map: unknown field '{name}'; mappable fields are {list(MAPPABLE)}")
        if name in out:
            raise ConfigError(f"--map: field '{name}' mapped twice")
        out[name] = col
    return out


def _to_float(val: Any, name: str) -> float | None:
    if val is None or (isinstance(val, str) and not val.strip()):
        return None
    if isinstance(val, bool | int | float):
        return float(val)
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            raise _BadRow(f"column '{name}': '{val}' is not a number") from None
    raise _BadRow(f"column '{name}': expected a number, got {type(val).__name__}")


def _to_correct(val: Any, name: str) -> float | None:
    """A correctness value as a float in [0, 1]: booleans, 0/1 numbers, true/false/yes/no text."""
    if val is None or (isinstance(val, str) and not val.strip()):
        return None
    if isinstance(val, str):
        s = val.strip().lower()
        if s in _TRUE:
            return 1.0
        if s in _FALSE:
            return 0.0
    f = _to_float(val, name)
    if f is None or not 0.0 <= f <= 1.0:
        raise _BadRow(f"column '{name}': '{val}' is not a correctness value (true/false or 0..1)")
    return f


def _to_text(val: Any, name: str) -> Any:
    # Gold answers are often numbers in JSON/parquet; labels are text in the schema.
    if name == "label" and isinstance(val, int | float) and not isinstance(val, bool):
        return str(val)
    return val


def _to_loop(val: Any, name: str) -> Any:
    if isinstance(val, str):
        try:
            return int(val.strip())
        except ValueError:
            raise _BadRow(f"column '{name}': '{val}' is not an integer") from None
    return val


def _pick(rec: Mapping[str, Any], name: str, opts: ImportOptions) -> tuple[bool, Any, str]:
    """(found, value, source column) for one field: mapping > constant > same-named column > default."""
    if name in opts.mapping:
        col = opts.mapping[name]
        if col not in rec:
            raise _BadRow(f"column '{col}' (mapped to {name}) is missing")
        return True, rec[col], col
    if opts.constants.get(name) is not None:
        return True, opts.constants[name], name
    if name in rec:
        return True, rec[name], name
    if name in DEFAULTS:
        return True, DEFAULTS[name], name
    return False, None, name


def record_to_row(rec: Mapping[str, Any], opts: ImportOptions) -> dict[str, Any]:
    """Map one source record to a raw schema row (not yet validated). Raises _BadRow."""
    row: dict[str, Any] = {}
    for name in MAPPABLE:
        found, val, col = _pick(rec, name, opts)
        if not found:
            continue
        if name in ("reward", "nll", "prompt_acc"):
            val = _to_float(val, col)
        elif name == "correct":
            val = _to_correct(val, col)
        elif name == "loop":
            val = _to_loop(val, col)
        else:
            val = _to_text(val, name)
        if val is not None:
            row[name] = val
    if "reward" not in row and "correct" in row:
        row["reward"] = row["correct"]  # correctness logs: reward = correct as 0/1
    return row


def _rows_from_records(records: Iterable[tuple[str, int, Mapping[str, Any] | None, str | None]],
                       opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validate ``(file, line, record, error)`` items into schema rows; report the bad ones."""
    for path, n, rec, why in records:
        if why is None and rec is not None:
            try:
                row = normalize_row(record_to_row(rec, opts), source=path, row=n)
            except _BadRow as e:
                why = str(e)
            except DataError as e:
                report.bad(str(e), None, strict=opts.strict, max_examples=opts.max_examples)
                continue
            else:
                report.rows_read += 1
                yield row
                continue
        report.bad(f"{path} line {n}", why or "unreadable", strict=opts.strict, max_examples=opts.max_examples)


def _jsonl_records(path: Path) -> Iterator[tuple[str, int, Mapping[str, Any] | None, str | None]]:
    for n, text, why in _text_lines(path):
        if why is not None:
            yield str(path), n, None, why
            continue
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            yield str(path), n, None, f"not JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(rec, dict):
            yield str(path), n, None, f"expected a JSON object, got {type(rec).__name__}"
            continue
        yield str(path), n, rec, None


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _parquet_records(path: Path, pf: pq.ParquetFile,
                     batch_size: int) -> Iterator[tuple[str, int, Mapping[str, Any] | None, str | None]]:
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            yield str(path), n, rec, None  # parquet rows are numbered from 0
            n += 1


def jsonl_rows(path: str | Path, opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from a JSONL file (one JSON object per line)."""
    p = _require_file(path, "JSONL input")
    return _rows_from_records(_jsonl_records(p), opts, report)


def csv_rows(path: str | Path, opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from a CSV file with a header line."""
    p = _require_file(path, "CSV input")
    records = ((str(p), n, rec, None) for n, rec in _csv_dicts(p, report, opts))
    return _rows_from_records(records, opts, report)


def parquet_rows(path: str | Path, opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from a parquet file (row numbers are 0-based)."""
    p = _require_file(path, "parquet input")
    pf = _open_parquet(p)  # now, so a bad file fails before streaming starts
    return _rows_from_records(_parquet_records(p, pf, opts.chunk_size), opts, report)


# -- Prompt-OIRL logs ------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> dict[str, str]:
    """The alias -> prompt text mapping (a JSON object, like Prompt-OIRL's prompts.json)."""
    p = _require_file(path, "prompts file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a JSON file ({e})") from None
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
            raise _BadRow(f"placeholder number{i} but Numbers has {len(nums)} entr{'y' if len(nums) == 1 else 'ies'}")
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


QueryRow = tuple[str, str] | str  # (question, gold answer), or why the query row is unusable


def _csv_queries(path: Path, report: ImportReport, opts: ImportOptions) -> Iterator[QueryRow]:
    # Bad records still take an index, so later rows keep their alignment with the log lines.
    records = _csv_records(path)
    header: list[str] | None = None
    for n, rec, why in records:
        where = f"{path} line {n}"
        if header is None:
            if why is not None:
                raise DataError(f"{where}: unreadable header ({why})")
            header = [h.strip() for h in rec]
            missing = [c for c in ("Question", "Numbers", "Answer") if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} (header: {header})")
            qi, ni, ai = header.index("Question"), header.index("Numbers"), header.index("Answer")
            continue
        if why is None and len(rec) != len(header):
            why = f"expected {len(header)} fields, got {len(rec)}"
        if why is None:
            try:
                yield fill_numbers(rec[qi], rec[ni]).strip(), rec[ai].strip()
                continue
            except _BadRow as e:
                why = str(e)
        report.bad(where, why, strict=opts.strict, max_examples=opts.max_examples)
        yield f"{where}: {why}"
    if header is None:
        raise DataError(f"{path}: empty CSV file (no header)")


def _jsonl_queries(path: Path, report: ImportReport, opts: ImportOptions) -> Iterator[QueryRow]:
    for _, n, rec, why in _jsonl_records(path):
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


def corr_files(logs: str | Path) -> dict[str, Path]:
    """alias -> log file for every ``*_corr_<alias>.txt`` in ``logs``."""
    d = Path(logs)
    if not d.exists():
        raise DataError(f"log folder not found: {d}")
    if not d.is_dir():
        raise DataError(f"log folder is not a folder: {d}")
    out = {}
    for f in sorted(d.glob("*_corr_*.txt")):
        out[f.name[: -len(".txt")].rpartition("_corr_")[2]] = f
    if not out:
        raise DataError(f"{d}: no *_corr_<alias>.txt log files")
    return out


def parse_corr_line(text: str) -> tuple[int, bool]:
    """``"(12, True)"`` -> ``(12, True)``. Literal parsing only (ast.literal_eval), never eval."""
    try:
        val = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _BadRow(f"not a tuple literal: {text.strip()[:80]!r}") from None
    if not (isinstance(val, tuple) and len(val) == 2):
        raise _BadRow(f"expected (idx, True|False), got {text.strip()[:80]!r}")
    idx, ok = val
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise _BadRow(f"index {idx!r} is not a non-negative integer")
    if not isinstance(ok, bool):
        raise _BadRow(f"correctness {ok!r} is not True/False")
    return idx, ok


def _oirl_file_rows(path: Path, alias: str, prompt: str, queries: list[QueryRow], base: dict[str, Any],
                    opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Rows of one correctness log, streamed line by line (``repeats="mean"`` groups per question text)."""
    seen: set[int] = set()
    groups: dict[str, list[Any]] = {}  # question -> [sum correct, count, label, line]; <= one per query
    for n, text, why in _text_lines(path):
        where = f"{path} line {n}"
        if why is None and not text.strip():
            continue
        try:
            if why is not None:
                raise _BadRow(why)
            idx, ok = parse_corr_line(text)
            if idx >= len(queries):
                raise _BadRow(f"index {idx} is past the query table ({len(queries)} rows)")
            if idx in seen:
                raise _BadRow(f"index {idx} appears twice in this file")
            seen.add(idx)
            q = queries[idx]
            if isinstance(q, str):
                raise _BadRow(f"query {idx} is unusable ({q})")
        except _BadRow as e:
            report.bad(where, str(e), strict=opts.strict, max_examples=opts.max_examples)
            continue
        if opts.repeats == "mean":
            g = groups.setdefault(q[0], [0.0, 0, q[1], n])
            g[0] += float(ok)
            g[1] += 1
            continue
        row = _oirl_row(base, q[0], q[1], prompt, alias, float(ok), str(path), n, opts, report)
        if row is not None:
            yield row
    for question, (total, count, label, n) in groups.items():
        row = _oirl_row(base, question, label, prompt, alias, total / count, str(path), n, opts, report)
        if row is not None:
            yield row


def _oirl_row(base: dict[str, Any], query: str, label: str, prompt: str, alias: str, correct: float,
              path: str, line: int, opts: ImportOptions, report: ImportReport) -> dict[str, Any] | None:
    raw = {**base, "query": query, "label": label, "prompt": prompt, "reward": correct, "correct": correct,
           "source": f"offline:{alias}", "loop": 0}
    try:
        row = normalize_row(raw, source=path, row=line)
    except DataError as e:
        report.bad(str(e), None, strict=opts.strict, max_examples=opts.max_examples)
        return None
    report.rows_read += 1
    return row


def oirl_rows(logs: str | Path, queries: str | Path, prompts: str | Path, opts: ImportOptions,
              report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from Prompt-OIRL correctness logs; one log file is open at a time.

    ``opts.constants`` gives ``target`` (required), ``task`` (default: the log folder's name) and
    ``setting`` (default zero_shot). Files are read in the prompts file's alias order."""
    files = corr_files(logs)
    texts = load_prompts(prompts)
    c = opts.constants
    base = {"task": c.get("task") or Path(logs).resolve().name, "target": c.get("target"),
            "setting": c.get("setting") or "zero_shot"}
    if not base["target"]:
        raise DataError("oirl import: give the target model that produced the logs (--target)")
    if base["setting"] not in SETTINGS:
        raise DataError(f"--setting: '{base['setting']}' is not one of {SETTINGS}")
    table = load_queries(queries, report, opts)
    dup, uniq = count_duplicate_queries(table)
    report.duplicate_queries = dup
    if dup:
        log.warning("%s: %d of %d query rows repeat an earlier question text (%d unique); they share a split",
                    queries, dup, len(table), uniq)
    report.files_missing.extend(f"{Path(logs) / f'*_corr_{a}.txt'} (prompt '{a}' has no log)"
                                for a in texts if a not in files)
    order = [a for a in texts if a in files] + [a for a in files if a not in texts]
    return _oirl_stream(order, files, texts, table, base, opts, report)


def _oirl_stream(order: list[str], files: dict[str, Path], texts: dict[str, str], table: list[QueryRow],
                 base: dict[str, Any], opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    for alias in order:
        if alias not in texts:
            report.bad(str(files[alias]), f"alias '{alias}' is not in the prompts file; file skipped",
                       strict=opts.strict, max_examples=opts.max_examples)
            continue
        yield from _oirl_file_rows(files[alias], alias, texts[alias], table, base, opts, report)


# -- split, chunking, store ------------------------------------------------------------------------


class _TestQueryWriter:
    """Writes each unique test-split query once (JSONL) to a temporary file, renamed into place at close."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.tmp = self.path.with_name(self.path.name + ".tmp") if self.path else None
        self.fh: io.TextIOBase | None = None
        self.count = 0

    def add(self, row: Mapping[str, Any]) -> None:
        if self.tmp is None:
            return
        if self.fh is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.tmp, "w", encoding="utf-8")
        rec = {k: row[k] for k in ("task", "query_id", "query", "label")}
        self.fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self, ok: bool) -> None:
        if self.tmp is None:
            return
        if self.fh is None:  # no test queries: still leave an (empty) file, so callers can rely on it
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.tmp, "w", encoding="utf-8")
        self.fh.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def split_rows(rows: Iterable[dict[str, Any]], opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Keep the rows of ``opts.split``; count unique queries per split; write the test-queries file."""
    writer = _TestQueryWriter(opts.test_queries_out)
    seen: dict[str, set[str]] = {"train": set(), "test": set()}  # query ids; one entry per unique query
    ok = False
    try:
        for row in rows:
            s = split_of(row["query"], opts.test_fraction, opts.seed)
            if row["query_id"] not in seen[s]:
                seen[s].add(row["query_id"])
                if s == "test":
                    writer.add(row)
            if opts.split in ("all", s):
                yield row
            else:
                report.rows_other_split += 1
        ok = True
    finally:
        report.unique_queries = {k: len(v) for k, v in seen.items()}
        report.test_queries_written = writer.count
        writer.close(ok)


def chunk_tables(rows: Iterable[Mapping[str, Any]], chunk_size: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Arrow tables (exact SCHEMA) of at most ``chunk_size`` rows each."""
    buf: list[Mapping[str, Any]] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= chunk_size:
            yield pa.Table.from_pylist(buf, schema=SCHEMA)
            buf = []
    if buf:
        yield pa.Table.from_pylist(buf, schema=SCHEMA)


def _tables(rows: Iterable[dict[str, Any]], opts: ImportOptions, report: ImportReport) -> Iterator[pa.Table]:
    return chunk_tables(split_rows(rows, opts, report), opts.chunk_size)


def read_jsonl(path: str | Path, opts: ImportOptions | None = None, report: ImportReport | None = None) -> Iterator[pa.Table]:
    """JSONL -> chunks of schema rows (split applied)."""
    opts, report = opts or ImportOptions(), report if report is not None else ImportReport(source=str(path))
    return _tables(jsonl_rows(path, opts, report), opts, report)


def read_csv(path: str | Path, opts: ImportOptions | None = None, report: ImportReport | None = None) -> Iterator[pa.Table]:
    """CSV -> chunks of schema rows (split applied)."""
    opts, report = opts or ImportOptions(), report if report is not None else ImportReport(source=str(path))
    return _tables(csv_rows(path, opts, report), opts, report)


def read_parquet(path: str | Path, opts: ImportOptions | None = None, report: ImportReport | None = None) -> Iterator[pa.Table]:
    """Parquet -> chunks of schema rows (split applied)."""
    opts, report = opts or ImportOptions(), report if report is not None else ImportReport(source=str(path))
    return _tables(parquet_rows(path, opts, report), opts, report)


def read_oirl(logs: str | Path, queries: str | Path, prompts: str | Path, opts: ImportOptions | None = None,
              report: ImportReport | None = None) -> Iterator[pa.Table]:
    """Prompt-OIRL logs -> chunks of schema rows (split applied). Checks the inputs before returning."""
    opts, report = opts or ImportOptions(), report if report is not None else ImportReport(source=str(logs))
    return _tables(oirl_rows(logs, queries, prompts, opts, report), opts, report)


def read_format(fmt: str, opts: ImportOptions, report: ImportReport, *, path: str | Path | None = None,
                logs: str | Path | None = None, queries: str | Path | None = None,
                prompts: str | Path | None = None) -> Iterator[pa.Table]:
    """Dispatch to the reader of ``fmt``; missing arguments are DataErrors that name the flag."""
    if fmt == "oirl":
        for flag, val in (("--logs", logs), ("--queries", queries), ("--prompts", prompts)):
            if not val:
                raise DataError(f"oirl import: {flag} is required")
        return read_oirl(logs, queries, prompts, opts, report)
    readers = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}
    if fmt not in readers:
        raise DataError(f"unknown import format '{fmt}'; one of {FORMATS}")
    if not path:
        raise DataError(f"{fmt} import: --input is required")
    return readers[fmt](path, opts, report)


def import_to_store(run_dir: str | Path, fmt: str, *, path: str | Path | None = None,
                    logs: str | Path | None = None, queries: str | Path | None = None,
                    prompts: str | Path | None = None, opts: ImportOptions | None = None) -> ImportReport:
    """Import into the run's dataset store as one new version (a child of the latest one, if any).

    Rows stream from the reader into :meth:`DatasetStore.commit`, which re-validates, drops repeated pair
    keys and commits atomically. Raises DataError when no valid row is left to write."""
    opts = opts or ImportOptions()
    source = str(path or logs)
    report = ImportReport(source=source)
    tables = read_format(fmt, opts, report, path=path, logs=logs, queries=queries, prompts=prompts)
    first = next(tables, None)  # peek: an import with nothing valid should say why, not commit nothing
    if first is None:
        hint = f"; e.g. {report.skipped_examples[0]}" if report.skipped_examples else ""
        raise DataError(f"{source}: no rows to import ({report.rows_read} valid, {report.rows_other_split} in the "
                        f"other split, {report.skipped} bad line(s) skipped){hint}")
    store = DatasetStore(run_dir)
    m = store.commit(chain([first], tables), parent=store.latest(), source=source, note=f"import {fmt} {source}")
    report.version, report.rows_written, report.duplicates_dropped = m.version, m.new_rows, m.duplicates_dropped
    if report.skipped:
        log.warning("%s: skipped %d bad line(s); first: %s", source, report.skipped, report.skipped_examples[0])
    return report


# -- CLI -------------------------------------------------------------------------------------------


def add_import_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``qpo-ray data import``."""
    a = parser.add_argument
    a("--format", required=True, choices=FORMATS, help="input format")
    a("--run-dir", required=True, help="run directory; the import becomes its next dataset version")
    a("--input", help="input file (jsonl, csv, parquet)")
    a("--map", default="", metavar="FIELD=COL,...",
      help=f"source column of each schema field, e.g. query=question,prompt=instruction,reward=score; "
           f"correct=COL gives reward = correct (0/1). Fields: {','.join(MAPPABLE)}")
    a("--task", help="task name for every row (oirl default: the log folder's name)")
    a("--target", help="target LLM that produced the rewards (required for oirl)")
    a("--setting", choices=SETTINGS, help="zero_shot (default) or few_shot")
    a("--label", help="constant gold label for every row (default: a mapped/label column, else '')")
    a("--source", help="source tag for every row (default offline:import; oirl: offline:<alias>)")
    a("--logs", metavar="DIR", help="oirl: folder of *_corr_<alias>.txt files")
    a("--queries", metavar="DIR|FILE", help="oirl: folder of fold<k>/train.csv, a CSV, or JSONL question/answer")
    a("--prompts", metavar="FILE", help="oirl: JSON object alias -> prompt text")
    a("--repeats", choices=("first", "mean"), default="first",
      help="oirl: one row per log line (first; the store keeps the first repeat) or mean correctness per question")
    a("--split", choices=SPLITS, default="all", help="which split of the unique queries to write")
    a("--test-fraction", type=float, default=0.2, help="share of unique queries in the test split")
    a("--seed", type=int, default=0, help="seed of the query-text hash split")
    a("--test-queries-out", metavar="FILE", help="write the unique test-split queries (JSONL) here")
    a("--chunk-size", type=int, default=CHUNK_ROWS, help="rows per Arrow chunk streamed into the store")
    a("--strict", action="store_true", help="stop at the first bad line instead of skipping it")


def options_from_args(args: argparse.Namespace) -> ImportOptions:
    constants = {k: getattr(args, k, None) for k in ("task", "target", "setting", "label", "source")}
    return ImportOptions(
        mapping=parse_mapping(args.map), constants={k: v for k, v in constants.items() if v is not None},
        split=args.split, test_fraction=args.test_fraction, seed=args.seed, strict=args.strict,
        chunk_size=args.chunk_size, repeats=args.repeats, test_queries_out=args.test_queries_out,
    )


def run_import(args: argparse.Namespace) -> int:
    """Run ``qpo-ray data import``; prints the report. QPOErrors propagate for the CLI to print."""
    report = import_to_store(args.run_dir, args.format, path=args.input, logs=args.logs, queries=args.queries,
                             prompts=args.prompts, opts=options_from_args(args))
    print(report.summary())
    return 0


__all__ = [
    "CHUNK_ROWS", "FORMATS", "ImportOptions", "ImportReport", "add_import_args", "chunk_tables", "corr_files",
    "fill_numbers", "import_to_store", "load_prompts", "load_queries", "normalize_text", "parse_corr_line",
    "parse_mapping", "read_csv", "read_format", "read_jsonl", "read_oirl", "read_parquet", "record_to_row",
    "run_import", "split_of",
]
