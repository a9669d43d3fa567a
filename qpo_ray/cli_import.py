"""``qpo-ray data import``: its arguments, and running an import from them (the data package has no argparse)."""

from __future__ import annotations

import argparse

from qpo_ray.data.importers import (
    CHUNK_ROWS,
    DEFAULT_LOG_PATTERN,
    FORMATS,
    MAPPABLE,
    SPLITS,
    ImportOptions,
    import_to_store,
    parse_mapping,
    parse_query_rows,
)
from qpo_ray.data.schema import SETTINGS


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
    a("--label", help="constant gold label for every row (default: the column mapped with --map label=COL, else "
                      "a column named 'label'; every row needs a non-empty label: a row without one is a bad row)")
    a("--source", help="source tag for every row (default offline:import; oirl: offline:<alias>)")
    a("--logs", metavar="DIR", help="oirl: folder of correctness logs, one per prompt alias")
    a("--log-pattern", default=DEFAULT_LOG_PATTERN, metavar="PATTERN",
      help="oirl: which files of --logs are logs: '*' matches any text, {alias} the prompt alias, e.g. "
           f"'gsm8k_test_corr_{{alias}}.txt'; two files with one alias are an error [{DEFAULT_LOG_PATTERN}]")
    a("--queries", metavar="DIR|FILE", help="oirl: folder of fold<k>/train.csv, a CSV, or JSONL question/answer; "
                                            "log line (i, ok) is the answer to its row i")
    a("--prompts", metavar="FILE", help="oirl: JSON object alias -> prompt text")
    a("--aliases", metavar="GLOB,...", default="",
      help="oirl: import only these prompt aliases (comma-separated; '*' wildcards), e.g. 'gpt4_*' [all]")
    a("--query-rows", metavar="START:STOP",
      help="oirl: the logs were scored on these rows of --queries (from 0; STOP may be left out): log index i is "
           "row START+i, e.g. 6000: for Prompt-OIRL's gpt4_* MAWPS logs [all rows]")
    a("--allow-partial-logs", action="store_true",
      help="oirl: a log whose line count differs from the --queries rows is an error; with this flag its lines "
           "are joined by index anyway and a warning counts the unmatched log lines and query rows")
    a("--repeats", choices=("first", "mean"), default="first",
      help="oirl: one row per log line (first; the store keeps the first repeat) or mean correctness per question")
    a("--split", choices=SPLITS, default="all", help="which split of the unique queries to write")
    a("--test-fraction", type=float, default=0.2, help="share of unique queries in the test split")
    a("--seed", type=int, default=0, help="seed of the query-text hash split")
    a("--test-queries-out", metavar="FILE", help="write the unique test-split queries (JSONL) here")
    a("--chunk-size", type=int, default=CHUNK_ROWS, help="rows per Arrow chunk streamed into the store")
    a("--strict", action="store_true", help="stop at the first bad line instead of skipping it")


def options_from_args(args: argparse.Namespace) -> ImportOptions:
    """The ImportOptions the parsed arguments ask for."""
    constants = {k: getattr(args, k, None) for k in ("task", "target", "setting", "label", "source")}
    return ImportOptions(
        mapping=parse_mapping(args.map), constants={k: v for k, v in constants.items() if v is not None},
        split=args.split, test_fraction=args.test_fraction, seed=args.seed, strict=args.strict,
        chunk_size=args.chunk_size, repeats=args.repeats, log_pattern=args.log_pattern,
        aliases=tuple(g.strip() for g in args.aliases.split(",") if g.strip()),
        query_rows=parse_query_rows(args.query_rows) if args.query_rows else None,
        allow_partial_logs=args.allow_partial_logs, test_queries_out=args.test_queries_out,
    )


def run_import(args: argparse.Namespace) -> int:
    """Run ``qpo-ray data import``; prints the report. QPOErrors propagate for the CLI to print."""
    report = import_to_store(args.run_dir, args.format, path=args.input, logs=args.logs, queries=args.queries,
                             prompts=args.prompts, opts=options_from_args(args))
    print(report.summary())
    return 0
