"""The one Arrow schema every dataset row follows (docs/design.md §4), question identity, stable content ids, and row
validation."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import pyarrow as pa

from qpo_ray.errors import DataError
from qpo_ray.ids import content_id

SETTINGS = ("zero_shot", "few_shot")

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # pair key: hash(task, target, setting, query, prompt)
        pa.field("task", pa.string(), nullable=False),
        pa.field("setting", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # may be "" (no instruction)
        pa.field("reward", pa.float64(), nullable=False),  # raw reward, before normalisation
        pa.field("correct", pa.float64(), nullable=True),  # raw components, so the formula can change later
        pa.field("nll", pa.float64(), nullable=True),
        pa.field("prompt_acc", pa.float64(), nullable=True),
        pa.field("source", pa.string(), nullable=False),  # offline:<method> | loop-<t>
        pa.field("loop", pa.int32(), nullable=False),  # 0 for offline rows
    ]
)
COLUMNS = tuple(SCHEMA.names)
REQUIRED_TEXT = ("task", "setting", "target", "query", "label", "source")
# Raw rewards live within ±MAX_ABS_REWARD: far beyond any real scale (0-1, 0-100, 10·acc − NLL), and near
# enough to zero that the normalisation's range (max − min) cannot overflow. Two rows at ±1e308 made that
# range infinite, every normalised reward NaN, and the trained policy NaN.
MAX_ABS_REWARD = 1e6
OPTIONAL_FLOATS = ("correct", "nll", "prompt_acc")


def normalize_text(text: str) -> str:
    """Whitespace collapsed and case folded: the identity of a question for splitting and matching."""
    return " ".join(text.split()).casefold()


def split_of(query_text: str, test_fraction: float, seed: int = 0) -> Literal["train", "test"]:
    """The split of a query, from a seeded hash of its normalised text (so repeats share a split)."""
    h = hashlib.sha256(f"{seed}\0{normalize_text(query_text)}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "test" if u < test_fraction else "train"


def query_id(task: str, query: str) -> str:
    return content_id("q", task, query)


def prompt_id(prompt: str) -> str:
    return content_id("p", prompt)


def pair_key(task: str, target: str, setting: str, query: str, prompt: str) -> str:
    """The identity of a scored pair: a key is scored at most once per dataset (docs/design.md §2, merge)."""
    return content_id("k", task, target, setting, query, prompt, n=32)


def _where(source: str, row: int, column: str) -> str:
    return f"{source}: row {row}, column '{column}'"


def normalize_row(raw: Mapping[str, Any], *, source: str = "<rows>", row: int = 0) -> dict[str, Any]:
    """Validate one row and fill derived ids. Raises DataError naming source, row and column."""
    out: dict[str, Any] = {}
    for col in REQUIRED_TEXT + ("prompt",):
        if col not in raw or raw[col] is None:
            raise DataError(f"{_where(source, row, col)}: missing")
        val = raw[col]
        if not isinstance(val, str):
            raise DataError(f"{_where(source, row, col)}: expected text, got {type(val).__name__}")
        if "\ufffd" in val:
            raise DataError(f"{_where(source, row, col)}: not valid UTF-8 text (replacement characters)")
        out[col] = val
    for col in ("task", "target", "query", "label", "source"):
        if not out[col].strip():
            raise DataError(f"{_where(source, row, col)}: empty")
    if out["setting"] not in SETTINGS:
        raise DataError(f"{_where(source, row, 'setting')}: '{out['setting']}' is not one of {SETTINGS}")
    out["reward"] = _float(raw.get("reward"), source, row, "reward", required=True)
    for col in OPTIONAL_FLOATS:
        out[col] = _float(raw.get(col), source, row, col, required=False)
    loop = raw.get("loop", 0)
    if isinstance(loop, bool) or not isinstance(loop, int | float) or loop != int(loop) or loop < 0:
        raise DataError(f"{_where(source, row, 'loop')}: expected a non-negative integer, got {loop!r}")
    out["loop"] = int(loop)
    out["query_id"] = query_id(out["task"], out["query"])
    out["prompt_id"] = prompt_id(out["prompt"])
    out["key"] = pair_key(out["task"], out["target"], out["setting"], out["query"], out["prompt"])
    for col in ("query_id", "prompt_id", "key"):
        given = raw.get(col)
        if given not in (None, "", out[col]):
            raise DataError(f"{_where(source, row, col)}: '{given}' does not match the content hash '{out[col]}'")
    return out


def _float(val: Any, source: str, row: int, col: str, *, required: bool) -> float | None:
    if val is None:
        if required:
            raise DataError(f"{_where(source, row, col)}: missing")
        return None
    if isinstance(val, bool):
        val = float(val)
    if not isinstance(val, int | float):
        raise DataError(f"{_where(source, row, col)}: expected a number, got {type(val).__name__} {val!r}")
    f = float(val)
    if not math.isfinite(f):
        raise DataError(f"{_where(source, row, col)}: {f} is not a finite number")
    if col == "reward" and abs(f) > MAX_ABS_REWARD:
        raise DataError(f"{_where(source, row, col)}: {f!r} is outside [-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}]")
    return f


def rows_to_table(rows: Iterable[Mapping[str, Any]], *, source: str = "<rows>") -> pa.Table:
    """Validate rows and build a table with exactly SCHEMA."""
    norm = [normalize_row(r, source=source, row=i) for i, r in enumerate(rows)]
    return pa.Table.from_pylist(norm, schema=SCHEMA)


def check_table(table: pa.Table, *, source: str, row_offset: int = 0) -> pa.Table:
    """Check a chunk of rows against SCHEMA: column presence and types, then every row's values.

    Missing id columns (key, query_id, prompt_id) are derived. Call it per chunk: it converts rows to
    Python objects. Returns a table with exactly SCHEMA.
    """
    names = set(table.column_names)
    for field in SCHEMA:
        if field.name in ("key", "query_id", "prompt_id") and field.name not in names:
            continue
        if field.name in OPTIONAL_FLOATS and field.name not in names:
            continue
        if field.name not in names:
            raise DataError(f"{source}: missing column '{field.name}'")
        got = table.schema.field(field.name).type
        if got != field.type and not (pa.types.is_null(got) and field.nullable):
            ok = (pa.types.is_integer(got) or pa.types.is_floating(got)) and (
                pa.types.is_floating(field.type) or pa.types.is_integer(field.type)
            )
            if not ok and not (pa.types.is_large_string(got) and pa.types.is_string(field.type)):
                raise DataError(f"{source}: column '{field.name}' has type {got}, expected {field.type}")
    extra = names - set(COLUMNS)
    if extra:
        raise DataError(f"{source}: unknown column(s) {sorted(extra)}")
    rows = [normalize_row(r, source=source, row=row_offset + i) for i, r in enumerate(table.to_pylist())]
    # Rebuilt from the normalised rows so the ids are always the content hashes.
    return pa.Table.from_pylist(rows, schema=SCHEMA)
