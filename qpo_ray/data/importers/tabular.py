"""The generic formats (jsonl, csv, parquet): one row per record, fields found through a column mapping.

Each schema field comes from, in order: the column ``--map`` names for it, a constant given on the
command line, a source column of the same name, a default (``setting=zero_shot``,
``source=offline:import``, ``loop=0``). The reward comes from a reward column or, failing that, from a
correctness column (``--map correct=is_right``: reward = correct as 0/1, and ``correct`` is filled too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qpo_ray.data.importers.common import DEFAULTS, MAPPABLE, BadRow, ImportOptions, ImportReport
from qpo_ray.data.importers.records import (
    Record,
    csv_dict_records,
    duplicate_names,
    jsonl_records,
    require_file,
)
from qpo_ray.data.schema import normalize_row
from qpo_ray.errors import ConfigError, DataError

_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0"}


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
            raise BadRow(f"column '{name}': '{val}' is not a number") from None
    raise BadRow(f"column '{name}': expected a number, got {type(val).__name__}")


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
        raise BadRow(f"column '{name}': '{val}' is not a correctness value (true/false or 0..1)")
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
            raise BadRow(f"column '{name}': '{val}' is not an integer") from None
    return val


def _pick(rec: Mapping[str, Any], name: str, opts: ImportOptions) -> tuple[bool, Any, str]:
    """(found, value, source column) for one field: mapping > constant > same-named column > default."""
    if name in opts.mapping:
        col = opts.mapping[name]
        if col not in rec:
            raise BadRow(f"column '{col}' (mapped to {name}) is missing")
        return True, rec[col], col
    if opts.constants.get(name) is not None:
        return True, opts.constants[name], name
    if name in rec:
        return True, rec[name], name
    if name in DEFAULTS:
        return True, DEFAULTS[name], name
    return False, None, name


def record_to_row(rec: Mapping[str, Any], opts: ImportOptions) -> dict[str, Any]:
    """Map one source record to a raw schema row (not yet validated). Raises BadRow."""
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


def _rows_from_records(records: Iterable[Record], opts: ImportOptions,
                       report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validate records into schema rows; report the bad ones with file and line (or row)."""
    for path, unit, n, rec, why in records:
        if why is None and rec is not None:
            try:
                row = normalize_row(record_to_row(rec, opts), source=path, row=n)
            except BadRow as e:
                why = str(e)
            except DataError as e:
                report.bad(str(e), None, strict=opts.strict, max_examples=opts.max_examples)
                continue
            else:
                report.rows_read += 1
                yield row
                continue
        report.bad(f"{path} {unit} {n}", why or "unreadable", strict=opts.strict, max_examples=opts.max_examples)


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _parquet_records(path: Path, pf: pq.ParquetFile, batch_size: int) -> Iterator[Record]:
    # Rows are numbered from 1, like lines, so "row 1" is the first row whatever the format.
    dups = duplicate_names(pf.schema_arrow.names)
    ambiguous = f"column '{dups[0]}' appears twice in the parquet schema" if dups else None
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        recs = batch.to_pylist() if ambiguous is None else [None] * batch.num_rows
        for rec in recs:
            n += 1
            yield str(path), "row", n, rec, ambiguous


def jsonl_rows(path: str | Path, opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from a JSONL file (one JSON object per line)."""
    p = require_file(path, "JSONL input")
    return _rows_from_records(jsonl_records(p), opts, report)


def csv_rows(path: str | Path, opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from a CSV file with a header line."""
    p = require_file(path, "CSV input")
    return _rows_from_records(csv_dict_records(p), opts, report)


def parquet_rows(path: str | Path, opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Validated schema rows from a parquet file (rows numbered from 1)."""
    p = require_file(path, "parquet input")
    pf = _open_parquet(p)  # now, so a bad file fails before streaming starts
    return _rows_from_records(_parquet_records(p, pf, opts.chunk_size), opts, report)
