"""Job entrypoint for training only: ``python -m qpo_ray.jobs.train --config C --data RUN/data/vNNN --out DIR ...``.

Same arguments as ``qpo-ray train``.
"""

from __future__ import annotations

import sys

from qpo_ray.jobs import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli("train", argv)


if __name__ == "__main__":
    sys.exit(main())
