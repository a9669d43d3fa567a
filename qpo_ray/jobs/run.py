"""Job entrypoint for the full QPO pipeline: ``python -m qpo_ray.jobs.run --config C [--set K=V ...] [--resume DIR]``.

Same arguments as ``qpo-ray run``.
"""

from __future__ import annotations

import sys

from qpo_ray.jobs import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli("run", argv)


if __name__ == "__main__":
    sys.exit(main())
