"""Line-level reading: text lines, CSV records and JSON objects, each with the line it came from.

Readers never raise on one bad record: they yield why it is bad, so the caller can skip it and report
the file and line (or raise in strict mode).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qpo_ray.errors import DataError
from qpo_ray.jsonl import jsonl_lines, text_lines

_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8

# (file, unit, number, record, why): unit is "line" (text files) or "row" (parquet); a record is None
# exactly when why says what is wrong with it.
Record = tuple[str, str, int, dict[str, Any] | None, str | None]


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; a DataError naming ``what`` when it is missing or not a file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} is not a file: {p}")
    return p


def count_lines(path: Path) -> int:
    """Non-blank lines of a text file (a line that is not UTF-8 counts: it is a line of the log)."""
    return sum(1 for _, text, why in text_lines(path) if why is not None or text.strip())


def duplicate_names(names: list[str]) -> list[str]:
    """Names that occur more than once, in first-occurrence order (empty names are never read: ignored)."""
    seen: set[str] = set()
    dups: list[str] = []
    for name in names:
        if name and name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    return dups


def jsonl_records(path: Path) -> Iterator[Record]:
    """One record per non-blank line of a JSONL file; a line that is not one JSON object is a bad record."""
    for n, rec, why in jsonl_lines(path):
        yield str(path), "line", n, rec, why


def csv_records(path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
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


def csv_header(path: Path, n: int, rec: list[str] | None, why: str | None,
               required: tuple[str, ...] = ()) -> tuple[list[str], str | None]:
    """The header's column names, and why every data record is bad (a repeated name) or None.

    A missing required column or an unreadable header is a DataError: no record could be read."""
    if why is not None or rec is None:
        raise DataError(f"{path} line {n}: unreadable header ({why})")
    header = [h.strip() for h in rec]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (header: {header})")
    dups = duplicate_names(header)
    if dups:
        return header, f"column '{dups[0]}' appears twice in the header (line {n})"
    return header, None


def csv_dict_records(path: Path) -> Iterator[Record]:
    """CSV records as dicts keyed by the header; records that cannot be read carry why."""
    header: list[str] | None = None
    ambiguous: str | None = None
    for n, rec, why in csv_records(path):
        if header is None:
            header, ambiguous = csv_header(path, n, rec, why)
            continue
        if why is None and not rec:  # a blank line
            continue
        if why is None and ambiguous is not None:
            why = ambiguous
        if why is None and len(rec) != len(header):
            why = f"expected {len(header)} fields, got {len(rec)}"
        yield str(path), "line", n, dict(zip(header, rec, strict=True)) if why is None else None, why
    if header is None:
        raise DataError(f"{path}: empty CSV file (no header)")
