"""Entrypoints for ``ray job submit``: ``python -m qpo_ray.jobs.{run,train,evaluate} ...`` (see jobs/README.md).

Each is a thin wrapper over the ``qpo-ray`` CLI, so a job runs exactly what the command line runs. The
driver connects to the job's cluster through RAY_ADDRESS, which the job supervisor sets.
"""

from __future__ import annotations

import sys


def run_cli(command: str, argv: list[str] | None = None) -> int:
    """``qpo-ray <command> ARGV``; ``-v``/``--verbose`` may appear anywhere (the CLI wants it first)."""
    from qpo_ray.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in args if a in ("-v", "--verbose")]
    return main([*flags, command, *(a for a in args if a not in flags)])
