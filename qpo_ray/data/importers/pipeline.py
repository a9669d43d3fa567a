"""From validated rows to a committed dataset version: the split, Arrow chunks, and the store commit.

Splits are by unique query text (:func:`~qpo_ray.data.schema.split_of`), so repeats of a question never
land on both sides. Everything streams: rows become Arrow tables of at most ``chunk_size`` rows that flow
into :meth:`DatasetStore.commit`. An import that adds no row the latest version lacks commits nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qpo_ray.atomic import AtomicFile, write_error
from qpo_ray.data.importers.common import CHUNK_ROWS, FORMATS, ImportOptions, ImportReport
from qpo_ray.data.importers.oirl import oirl_rows
from qpo_ray.data.importers.tabular import csv_rows, jsonl_rows, parquet_rows
from qpo_ray.data.schema import SCHEMA, split_of
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError, ResourceError
from qpo_ray.locks import writer_lock

log = logging.getLogger(__name__)


class _EvalQueryWriter:
    """Writes each unique test-split query once (JSONL), atomically (``qpo_ray.atomic``) at close; with no
    test queries the file is still written (empty), so callers can rely on it."""

    def __init__(self, path: str | None):
        self.out = AtomicFile(path, "w") if path else None
        self.count = 0

    def add(self, row: Mapping[str, Any]) -> None:
        if self.out is None:
            return
        rec = {k: row[k] for k in ("task", "query_id", "query", "label")}
        try:
            self.out.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        except OSError as e:  # named here: the dataset commit reading these rows would take the blame
            raise write_error(self.out.path, e) from e
        self.count += 1

    def close(self, ok: bool) -> None:
        if self.out is None:
            return
        if ok:
            self.out.commit()
        else:
            self.out.discard()


def split_rows(rows: Iterable[dict[str, Any]], opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Keep the rows of ``opts.split``; count unique queries per split; write the test-queries file."""
    writer = _EvalQueryWriter(opts.test_queries_out)
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


def _defaults(opts: ImportOptions | None, report: ImportReport | None, source: str | Path
              ) -> tuple[ImportOptions, ImportReport]:
    return opts or ImportOptions(), report if report is not None else ImportReport(source=str(source))


def read_jsonl(path: str | Path, opts: ImportOptions | None = None,
               report: ImportReport | None = None) -> Iterator[pa.Table]:
    """JSONL -> chunks of schema rows (split applied)."""
    opts, report = _defaults(opts, report, path)
    return _tables(jsonl_rows(path, opts, report), opts, report)


def read_csv(path: str | Path, opts: ImportOptions | None = None,
             report: ImportReport | None = None) -> Iterator[pa.Table]:
    """CSV -> chunks of schema rows (split applied)."""
    opts, report = _defaults(opts, report, path)
    return _tables(csv_rows(path, opts, report), opts, report)


def read_parquet(path: str | Path, opts: ImportOptions | None = None,
                 report: ImportReport | None = None) -> Iterator[pa.Table]:
    """Parquet -> chunks of schema rows (split applied)."""
    opts, report = _defaults(opts, report, path)
    return _tables(parquet_rows(path, opts, report), opts, report)


def read_oirl(logs: str | Path, queries: str | Path, prompts: str | Path, opts: ImportOptions | None = None,
              report: ImportReport | None = None) -> Iterator[pa.Table]:
    """Prompt-OIRL logs -> chunks of schema rows (split applied). Checks the inputs before returning."""
    opts, report = _defaults(opts, report, logs)
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


def _not_in(tables: Iterable[pa.Table], store: DatasetStore, version: int,
            report: ImportReport) -> Iterator[pa.Table]:
    """The rows whose pair key ``version`` lacks (counted in ``report.rows_already_present``); empty
    chunks are dropped. Repeats within the import are left to the store, which counts them."""
    batches = [b.column(0) for b in store.iter_batches(version, 65536, ["key"])]
    have = pa.chunked_array(batches, pa.string()).combine_chunks()
    for t in tables:
        present = pc.is_in(t.column("key"), value_set=have)
        n = pc.sum(present).as_py() or 0
        report.rows_already_present += n
        if n:
            t = t.filter(pc.invert(present))
        if t.num_rows:
            yield t


def _check_writable(folder: Path) -> None:
    """That ``folder`` exists and is writable, or can be made where it is missing (nothing is created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ResourceError(f"cannot create {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResourceError(f"cannot write in {existing}: permission denied or a read-only file system")


def import_to_store(run_dir: str | Path, fmt: str, *, path: str | Path | None = None,
                    logs: str | Path | None = None, queries: str | Path | None = None,
                    prompts: str | Path | None = None, opts: ImportOptions | None = None) -> ImportReport:
    """Import into the run's dataset store as one new version (a child of the latest one, if any).

    Rows stream from the reader into :meth:`DatasetStore.commit`, which re-validates, drops repeated pair
    keys and commits atomically, holding the run directory's writer lock throughout (a second writer is refused
    at once). When every row is already in the latest version nothing is committed
    (``report.version`` is None). Raises DataError when no valid row is left to write."""
    opts = opts or ImportOptions()
    source = str(path or logs)
    report = ImportReport(source=source)
    tables = read_format(fmt, opts, report, path=path, logs=logs, queries=queries, prompts=prompts)
    store = DatasetStore(run_dir)
    _check_writable(store.root)  # before reading the input: a long import should not fail at its commit
    # One writer: the parent chosen here is still the latest version when the import commits.
    with writer_lock(run_dir):
        report.parent = store.latest()
        if report.parent is not None:
            tables = _not_in(tables, store, report.parent, report)
        first = next(tables, None)  # peek: an import with nothing to write should say why, not commit nothing
        if first is None:
            if report.rows_already_present:
                log.warning("%s", report.headline())
                return report
            hint = f"; e.g. {report.skipped_examples[0]}" if report.skipped_examples else ""
            raise DataError(f"{source}: no rows to import ({report.rows_read} valid, {report.rows_other_split} in "
                            f"the other split, {report.skipped} bad line(s) skipped){hint}")
        m = store.commit(chain([first], tables), parent=report.parent, source=source, note=f"import {fmt} {source}")
    report.version, report.rows_written, report.duplicates_dropped = m.version, m.new_rows, m.duplicates_dropped
    if report.skipped:
        log.warning("%s: skipped %d bad line(s); first: %s", source, report.skipped, report.skipped_examples[0])
    return report
