"""Importers: bring logged ``(query, prompt, reward)`` rows into the dataset store (docs/design.md §4).

Formats
- ``jsonl`` / ``csv`` / ``parquet`` (:mod:`.tabular`): one row per record, fields found through a column
  mapping (``--map query=question,reward=score``).
- ``oirl`` (:mod:`.oirl`, inputs in :mod:`.oirl_inputs`): Prompt-OIRL correctness logs, one file per
  prompt alias, joined by line index with a query table; ambiguous or mismatched logs are errors.

:mod:`.records` reads lines and records (a record that repeats a key or column name is a bad record),
:mod:`.pipeline` splits, chunks and commits, :mod:`.common` holds the options and the report.

Bad lines are reported with file and line number (parquet: row number, from 1). ``strict`` raises
:class:`DataError` on the first; otherwise they are skipped, counted and the first few quoted in the
:class:`ImportReport`. The command line (``qpo-ray data import``) is :mod:`qpo_ray.cli_import`.
"""

from qpo_ray.data.importers.common import (
    CHUNK_ROWS,
    DEFAULT_LOG_PATTERN,
    FORMATS,
    MAPPABLE,
    SPLITS,
    ImportOptions,
    ImportReport,
)
from qpo_ray.data.importers.oirl import corr_files, log_pattern_regex, parse_corr_line, parse_query_rows
from qpo_ray.data.importers.oirl_inputs import (
    count_duplicate_queries,
    fill_numbers,
    load_prompts,
    load_queries,
)
from qpo_ray.data.importers.pipeline import (
    chunk_tables,
    import_to_store,
    read_csv,
    read_format,
    read_jsonl,
    read_oirl,
    read_parquet,
    split_rows,
)
from qpo_ray.data.importers.tabular import parse_mapping, record_to_row

__all__ = [
    "CHUNK_ROWS", "DEFAULT_LOG_PATTERN", "FORMATS", "MAPPABLE", "SPLITS", "ImportOptions", "ImportReport",
    "chunk_tables", "corr_files", "count_duplicate_queries", "fill_numbers", "import_to_store", "load_prompts",
    "load_queries", "log_pattern_regex", "parse_corr_line", "parse_mapping", "parse_query_rows",
    "read_csv",
    "read_format", "read_jsonl", "read_oirl", "read_parquet", "record_to_row", "split_rows",
]
