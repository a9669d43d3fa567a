"""Prompt-OIRL correctness logs: a folder of per-prompt logs joined by line index with a query table.

Each log line is a tuple literal ``(idx, True)``: the target's answer to query row ``idx`` with that
prompt was correct. One row per log line: ``reward = correct = 1.0 if correct else 0.0`` (raw reward; the
store normalises later), ``source = offline:<alias>``, ``loop = 0``.

A join by index is only as good as the pairing of log and query table, so nothing is guessed:
- ``log_pattern`` (``*_corr_{alias}.txt`` by default) picks the log files and their aliases; two files
  with one alias (``gsm8k_corr_nan.txt`` and ``gsm8k_test_corr_nan.txt``) are an error naming both.
- ``aliases`` (globs) keeps only some aliases; ``query_rows`` says which slice of the query table a log
  was scored on (Prompt-OIRL's gpt4_* logs: rows 6000.. of MAWPS, indexed from 0).
- a log whose line count differs from the query table's rows is an error (it was scored on another
  question file), unless ``allow_partial_logs``: then the lines that name a query row are joined and a
  warning says how many log lines and query rows were left unmatched.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from qpo_ray.data.importers.common import DEFAULT_LOG_PATTERN, BadRow, ImportOptions, ImportReport
from qpo_ray.data.importers.oirl_inputs import QueryRow, count_duplicate_queries, load_prompts, load_queries
from qpo_ray.data.importers.records import count_lines
from qpo_ray.data.schema import SETTINGS, normalize_row
from qpo_ray.errors import ConfigError, DataError
from qpo_ray.jsonl import text_lines

log = logging.getLogger(__name__)


def log_pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regex of a log file name pattern: ``*`` matches any text, ``{alias}`` (once) the prompt alias."""
    if "/" in pattern or "\\" in pattern:
        raise ConfigError(f"--log-pattern '{pattern}': a file name inside --logs, not a path")
    if pattern.count("{alias}") != 1:
        raise ConfigError(f"--log-pattern '{pattern}': needs {{alias}} exactly once, e.g. '{DEFAULT_LOG_PATTERN}'")
    before, _, after = pattern.partition("{alias}")

    def literal(s: str) -> str:
        return ".*".join(re.escape(part) for part in s.split("*"))

    # A greedy '*' before {alias} makes the alias the shortest match: x_corr_a_corr_b.txt -> 'b'.
    return re.compile(f"{literal(before)}(?P<alias>.+){literal(after)}", re.DOTALL)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def selected(alias: str, globs: tuple[str, ...]) -> bool:
    """Whether ``alias`` matches one of ``globs`` (every alias does when there are none)."""
    return not globs or any(fnmatchcase(alias, g) for g in globs)


def parse_query_rows(text: str) -> tuple[int, int | None]:
    """``"6000:"`` -> ``(6000, None)``, ``"0:150"`` -> ``(0, 150)``."""
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return int(start or 0), int(stop) if stop.strip() else None
    except ValueError:
        raise ConfigError(f"--query-rows '{text}': expected START:STOP or START: (row numbers from 0)") from None


def corr_files(logs: str | Path, pattern: str = DEFAULT_LOG_PATTERN, aliases: tuple[str, ...] = ()) -> dict[str, Path]:
    """alias -> log file for every file of ``logs`` that ``pattern`` matches (and its alias ``aliases``).

    Two files with one alias are a DataError naming them: picking one would join the wrong lines."""
    d = Path(logs)
    if not d.exists():
        raise DataError(f"log folder not found: {d}")
    if not d.is_dir():
        raise DataError(f"log folder is not a folder: {d}")
    rx = log_pattern_regex(pattern)
    found: dict[str, list[tuple[Path, re.Match[str]]]] = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and (m := rx.fullmatch(f.name)) and selected(m.group("alias"), aliases):
            found.setdefault(m.group("alias"), []).append((f, m))
    if not found:
        only = f" with --aliases '{','.join(aliases)}'" if aliases else ""
        raise DataError(f"{d}: no log file matches --log-pattern '{pattern}'{only}")
    clashes = [(a, fs) for a, fs in found.items() if len(fs) > 1]
    if clashes:
        alias, fs = clashes[0]
        more = f" (so do {len(clashes) - 1} more alias(es))" if len(clashes) > 1 else ""
        # Each clashing file's own name, alias replaced: a pattern that picks its set alone.
        hints = [f"'{f.name[:m.start('alias')]}{{alias}}{f.name[m.end('alias'):]}'" for f, m in fs]
        raise DataError(f"{d}: {len(fs)} log files map to prompt alias '{alias}' under --log-pattern '{pattern}': "
                        f"{_join([str(f) for f, _ in fs])}{more}; choose one set with --log-pattern, "
                        f"e.g. {' or '.join(hints)}")
    return {a: fs[0][0] for a, fs in found.items()}


def parse_corr_line(text: str) -> tuple[int, bool]:
    """``"(12, True)"`` -> ``(12, True)``. Literal parsing only (ast.literal_eval), never eval."""
    try:
        val = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise BadRow(f"not a tuple literal: {text.strip()[:80]!r}") from None
    if not (isinstance(val, tuple) and len(val) == 2):
        raise BadRow(f"expected (idx, True|False), got {text.strip()[:80]!r}")
    idx, ok = val
    if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise BadRow(f"index {idx!r} is not a non-negative integer")
    if not isinstance(ok, bool):
        raise BadRow(f"correctness {ok!r} is not True/False")
    return idx, ok


def slice_queries(table: list[QueryRow], queries: str | Path, opts: ImportOptions) -> tuple[list[QueryRow], str]:
    """The rows of the table the logs were scored on (``opts.query_rows``), and how to name them."""
    if opts.query_rows is None:
        return table, str(queries)
    start, stop = opts.query_rows
    stop = len(table) if stop is None else stop
    if stop > len(table) or start >= stop:
        raise DataError(f"--query-rows {start}:{stop}: {queries} has {len(table)} query row(s)")
    return table[start:stop], f"{queries} rows {start}:{stop}"


def check_log_lengths(paths: list[Path], n_rows: int, queries: str, opts: ImportOptions) -> None:
    """A DataError when a log's line count differs from the query table's rows (unless allowed)."""
    if opts.allow_partial_logs:
        return
    off = [(p, k) for p in paths if (k := count_lines(p)) != n_rows]
    if not off:
        return
    p, k = off[0]
    others = f" ({len(off)} of {len(paths)} logs differ)" if len(off) > 1 else ""
    raise DataError(f"{p}: {k} log line(s) but {n_rows} query row(s) in {queries}{others}; line (i, ok) is the "
                    "answer to query row i, so this log was scored on other questions: name them with --queries "
                    "FILE (its logs picked with --log-pattern) or --query-rows START:STOP, or join by index anyway "
                    "with --allow-partial-logs (a warning counts what is left unmatched)")


def _oirl_file_rows(path: Path, alias: str, prompt: str, queries: list[QueryRow], base: dict[str, Any],
                    opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    """Rows of one correctness log, streamed line by line (``repeats="mean"`` groups per question text)."""
    seen: set[int] = set()  # indices joined to a query row: the matched lines
    lines = 0
    groups: dict[str, list[Any]] = {}  # question -> [sum correct, count, label, line]; <= one per query
    for n, text, why in text_lines(path):
        where = f"{path} line {n}"
        if why is None and not text.strip():
            continue
        lines += 1
        try:
            if why is not None:
                raise BadRow(why)
            idx, ok = parse_corr_line(text)
            if idx >= len(queries):
                raise BadRow(f"index {idx} is past the query table ({len(queries)} rows)")
            if idx in seen:
                raise BadRow(f"index {idx} appears twice in this file")
            seen.add(idx)
            q = queries[idx]
            if isinstance(q, str):
                raise BadRow(f"query {idx} is unusable ({q})")
        except BadRow as e:
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
    if lines != len(queries):  # only reached with allow_partial_logs (check_log_lengths ran first)
        msg = (f"{path}: {lines} log line(s) for {len(queries)} query row(s) (--allow-partial-logs): "
               f"{lines - len(seen)} log line(s) matched no query row, {len(queries) - len(seen)} query row(s) "
               "have no line in this log")
        report.warnings.append(msg)
        log.warning("%s", msg)
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
    ``setting`` (default zero_shot). Files are read in the prompts file's alias order. Every input is
    checked (files, aliases, log lengths) before the first row is returned."""
    files = corr_files(logs, opts.log_pattern, opts.aliases)
    texts = {a: t for a, t in load_prompts(prompts).items() if selected(a, opts.aliases)}
    c = opts.constants
    base = {"task": c.get("task") or Path(logs).resolve().name, "target": c.get("target"),
            "setting": c.get("setting") or "zero_shot"}
    if not base["target"]:
        raise DataError("oirl import: give the target model that produced the logs (--target)")
    if base["setting"] not in SETTINGS:
        raise DataError(f"--setting: '{base['setting']}' is not one of {SETTINGS}")
    table, table_name = slice_queries(load_queries(queries, report, opts), queries, opts)
    dup, uniq = count_duplicate_queries(table)
    report.duplicate_queries = dup
    if dup:
        log.warning("%s: %d of %d query rows repeat an earlier question text (%d unique); they share a split",
                    table_name, dup, len(table), uniq)
    report.files_missing.extend(f"{Path(logs) / opts.log_pattern.replace('{alias}', a)} (prompt '{a}' has no log)"
                                for a in texts if a not in files)
    order = [a for a in texts if a in files] + [a for a in files if a not in texts]
    check_log_lengths([files[a] for a in order if a in texts], len(table), table_name, opts)
    return _oirl_stream(order, files, texts, table, base, opts, report)


def _oirl_stream(order: list[str], files: dict[str, Path], texts: dict[str, str], table: list[QueryRow],
                 base: dict[str, Any], opts: ImportOptions, report: ImportReport) -> Iterator[dict[str, Any]]:
    for alias in order:
        if alias not in texts:
            report.bad(str(files[alias]), f"alias '{alias}' is not in the prompts file; file skipped",
                       strict=opts.strict, max_examples=opts.max_examples)
            continue
        yield from _oirl_file_rows(files[alias], alias, texts[alias], table, base, opts, report)
