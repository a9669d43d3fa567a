"""What every importer shares: the options of an import, its report, and the bad-record error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qpo_ray.errors import ConfigError, DataError

FORMATS = ("jsonl", "csv", "parquet", "oirl")
SPLITS = ("train", "test", "all")
CHUNK_ROWS = 50_000
MAX_EXAMPLES = 20
# Schema fields a source column can be mapped to (ids are always recomputed from content).
MAPPABLE = ("query", "prompt", "reward", "correct", "label", "task", "target", "setting", "nll",
            "prompt_acc", "source", "loop")
# No label default: the schema rejects an empty label, so a row without one is reported as missing it.
DEFAULTS: dict[str, Any] = {"setting": "zero_shot", "source": "offline:import", "loop": 0}
# Prompt-OIRL's layout: <task>_corr_<alias>.txt. '*' matches any text, {alias} the prompt alias.
DEFAULT_LOG_PATTERN = "*_corr_{alias}.txt"


class BadRow(ValueError):
    """One input record cannot become a row; the message says why (the caller adds where)."""


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
    # oirl: which files of the log folder are logs, and of which prompt alias; ``aliases`` (globs, e.g.
    # "gpt4_*") keeps only those aliases' logs and prompts.
    log_pattern: str = DEFAULT_LOG_PATTERN
    aliases: tuple[str, ...] = ()
    # oirl: the log was scored on query rows [start, stop) (stop None = to the end): index i is row start + i.
    query_rows: tuple[int, int | None] | None = None
    # oirl: a log whose line count differs from the query table is an error unless this is set; then the
    # lines that name a query row are joined and a warning gives the unmatched counts.
    allow_partial_logs: bool = False
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
        if self.query_rows is not None:
            start, stop = self.query_rows
            if start < 0 or (stop is not None and stop <= start):
                raise ConfigError(f"--query-rows {start}:{'' if stop is None else stop}: need 0 <= START < STOP")
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
    rows_already_present: int = 0  # rows whose pair key is already in the version the import builds on
    skipped: int = 0  # bad input lines (or records) skipped
    skipped_examples: list[str] = field(default_factory=list)
    duplicate_queries: int = 0  # oirl: query rows whose text repeats an earlier query row
    duplicates_dropped: int = 0  # rows the store dropped: their key repeats an earlier row of this import
    files_missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. partial logs joined with --allow-partial-logs
    unique_queries: dict[str, int] = field(default_factory=lambda: {"train": 0, "test": 0})
    test_queries_written: int = 0
    parent: int | None = None  # the latest version before the import
    version: int | None = None  # the version committed; None when nothing new was committed

    def bad(self, where: str, why: str | None, *, strict: bool, max_examples: int = MAX_EXAMPLES) -> None:
        """Record one bad line: raise in strict mode, else count it and keep the first few messages.

        ``where`` names file and line; ``why`` may be None when ``where`` is already a full message."""
        msg = where if why is None else f"{where}: {why}"
        if strict:
            raise DataError(msg)
        self.skipped += 1
        if len(self.skipped_examples) < max_examples:
            self.skipped_examples.append(msg)

    def headline(self) -> str:
        """One line: what was committed, or why nothing was."""
        if self.version is not None:
            return f"import {self.source}: {self.rows_written} row(s) written to dataset v{self.version:03d}"
        if self.parent is not None and self.rows_already_present:
            return (f"import {self.source}: no new rows: all {self.rows_already_present} row(s) to write are "
                    f"already in dataset v{self.parent:03d}; no version committed")
        return f"import {self.source}: {self.rows_written} row(s) written"

    def summary(self) -> str:
        """The headline, then the counts, warnings and the first few bad lines."""
        lines = [
            self.headline(),
            f"  read {self.rows_read} valid row(s); {self.rows_other_split} in the other split; "
            f"{self.duplicates_dropped} duplicate key(s) dropped"
            + (f"; {self.rows_already_present} already in v{self.parent:03d}" if self.parent is not None else ""),
            f"  unique queries: train {self.unique_queries['train']}, test {self.unique_queries['test']}",
        ]
        if self.duplicate_queries:
            lines.append(f"  {self.duplicate_queries} query row(s) repeat an earlier question text")
        if self.test_queries_written:
            lines.append(f"  {self.test_queries_written} unique test queries written")
        if self.files_missing:
            lines.append(f"  missing: {', '.join(self.files_missing)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        if self.skipped:
            lines.append(f"  skipped {self.skipped} bad line(s), e.g.:")
            lines.extend(f"    {m}" for m in self.skipped_examples[:5])
        return "\n".join(lines)
