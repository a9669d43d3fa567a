"""Whether a dataset file is what its manifest says: its checksum, and every row read back against SCHEMA.

``DatasetStore.verify`` uses both, so parquet that cannot be read, another schema, or rows that break it
(a NaN reward) are errors even when a checksum was updated to match the damage.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qpo_ray.data.schema import COLUMNS, MAX_ABS_REWARD, OPTIONAL_FLOATS, SCHEMA, SETTINGS
from qpo_ray.errors import DataError


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_rows(batch: pa.RecordBatch, where: Path, offset: int) -> None:
    """The schema's row rules, vectorised (``check_table`` converts rows to Python: too slow for a version)."""
    def fail(column: str, bad: pa.Array, why: str) -> None:
        i = pc.index(bad, True).as_py()
        if i >= 0:
            value = batch.column(column)[i].as_py()
            raise DataError(f"{where}: row {offset + i}, column '{column}': {value!r} {why}")

    for f in SCHEMA:
        if not f.nullable:
            fail(f.name, pc.is_null(batch.column(f.name)), "is missing (null)")
    for col in ("reward", *OPTIONAL_FLOATS):
        fail(col, pc.invert(pc.fill_null(pc.is_finite(batch.column(col)), True)), "is not a finite number")
    fail("reward", pc.greater(pc.abs(batch.column("reward")), MAX_ABS_REWARD),
         f"is outside [-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}]")
    for col in ("task", "target", "query", "label", "source"):
        fail(col, pc.equal(pc.utf8_trim_whitespace(batch.column(col)), ""), "is empty")
    fail("setting", pc.invert(pc.is_in(batch.column("setting"), value_set=pa.array(SETTINGS))),
         f"is not one of {SETTINGS}")
    fail("loop", pc.less(batch.column("loop"), 0), "is negative")


def read_checked(path: Path, rows: int) -> None:
    """Read a parquet file whole, batch by batch: readable, SCHEMA's columns and types, ``rows`` valid rows."""
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        for f in SCHEMA:
            if f.name not in schema.names:
                raise DataError(f"{path}: missing column '{f.name}'")
            if schema.field(f.name).type != f.type:
                raise DataError(f"{path}: column '{f.name}' has type {schema.field(f.name).type}, expected {f.type}")
        n = pf.metadata.num_rows
        if n != rows:
            raise DataError(f"{path}: {n} rows, manifest says {rows}")
        seen = 0
        for batch in pf.iter_batches(batch_size=65536, columns=list(COLUMNS)):
            check_rows(batch, path, seen)
            seen += batch.num_rows
    except (pa.ArrowException, OSError) as e:  # truncated or not parquet at all
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if seen != rows:
        raise DataError(f"{path}: {seen} readable rows, manifest says {rows}")


__all__ = ["check_rows", "read_checked", "sha256_file"]
